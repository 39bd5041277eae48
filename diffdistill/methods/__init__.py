"""Method registry: method name -> module that defines ``METHOD`` (a :class:`~.base.Method` subclass).

Adding a method is one new file in this package plus one line here and a config.
"""

from __future__ import annotations

import importlib

from .base import Batch, Method, OptimConfig, StepOutput

METHOD_MODULES: dict[str, str] = {
    "dsm": "diffdistill.methods.dsm_text",  # denoising score matching (pixel or text): trains a teacher
    "dmd2": "diffdistill.methods.dmd2",
    "ict": "diffdistill.methods.ict",
    "cd": "diffdistill.methods.consistency_distillation",
    "tscd": "diffdistill.methods.consistency_distillation",
    "boot": "diffdistill.methods.boot",
    "disback": "diffdistill.methods.disback",
    "msd": "diffdistill.methods.msd",
}


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name`` (``ValueError`` listing the choices otherwise)."""
    if name not in METHOD_MODULES:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHOD_MODULES))}")
    try:
        module = importlib.import_module(METHOD_MODULES[name])
    except ModuleNotFoundError as e:
        if e.name != METHOD_MODULES[name]:
            raise
        from ..errors import UserError

        raise UserError(f"method {name!r} is planned but not implemented yet") from None
    methods = getattr(module, "METHODS", None) or {module.METHOD.name: module.METHOD}
    return methods[name]


__all__ = ["Batch", "Method", "OptimConfig", "StepOutput", "METHOD_MODULES", "get_method"]
