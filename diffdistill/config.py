"""Run configuration: YAML into typed, validated dataclasses.

Unknown keys are rejected with a "did you mean" suggestion, values are type-checked, ``--set a.b=v``
overrides are parsed as YAML scalars. The method's own hyperparameters live in a section named after
the method (``dmd2:``, ``ict:`` ...), validated against that method's ``Config`` dataclass.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import UserError
from .paths import resolve_path


@dataclass
class TeacherConfig:
    path: str = ""  # diffusers folder, Hub id, or a run folder written by `diffdistill teacher train`
    guidance_scale: float = 1.0  # classifier-free guidance on the teacher (1 = plain conditional)
    dtype: str = "float32"  # weights dtype of the frozen teacher (float32, bfloat16, float16)


@dataclass
class DataConfig:
    name: str = "digits"  # digits | folder | toy2d | prompts
    path: str = ""  # image folder (folder), prompt file (prompts)
    resolution: int = 16  # images are resized and centre-cropped to this size
    channels: Optional[int] = None  # 1 or 3; None keeps the data's own (digits: 1, folder: 3)


@dataclass
class StudentConfig:
    kind: str = "copy"  # copy (teacher weights) | small (smaller net, `small` overrides) | lora
    steps: int = 1  # sampling steps of the student
    levels: Optional[list[float]] = None  # explicit descending sigmas; default: evenly spaced timesteps
    lora_rank: int = 64  # LoRA rank (kind: lora)
    small: dict = field(default_factory=dict)  # constructor overrides for kind: small
    renoise: str = "fresh"  # between steps: fresh noise (DMD2) or ddim (deterministic, TSCD/PCM)


@dataclass
class TrainConfig:
    steps: int = 1000  # optimisation steps (generator + critic turns count as one step)
    batch_size: int = 32  # global batch size, split across processes (and micro-batches)
    # micro-batches per step (gradient accumulation): train.batch_size stays the global batch, so results
    # match grad_accum 1 up to float rounding; must divide batch_size / processes
    grad_accum: int = 1
    seed: int = 0  # seeds data order and every random draw
    lr: float = 1e-4  # AdamW learning rate of every trained network (methods may set their own)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 10.0  # max gradient norm (0 disables)
    lr_schedule: str = "constant_with_warmup"  # any diffusers.optimization schedule name
    warmup_steps: int = 0  # LR warm-up steps
    ema_decay: float = 0.0  # EMA of the student for evaluation (0 disables)
    checkpoint_every: int = 500  # save a checkpoint every N steps (and at the end)
    keep_checkpoints: int = 3  # keep the newest N checkpoints (0 keeps all)
    sample_every: int = 500  # write a sample grid every N steps (0 disables)
    log_every: int = 10  # log losses every N steps
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp16 uses a gradient scaler)


@dataclass
class Config:
    method: str = "dmd2"  # dmd2, ict, cd, tscd, boot, disback, msd (dsm trains a teacher)
    output_dir: str = "runs/default"  # run folder
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method_config: Any = None  # the method's own section, filled by `load_config`


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check (and gently coerce int -> float, list -> tuple) ``value`` against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string: accept it as a number
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is bool:
        words = {"yes": True, "on": True, "no": False, "off": False}  # the YAML 1.1 words kept as text by --set
        if isinstance(value, str) and value.lower() in words:
            return True, words[value.lower()]
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(tp)
        out = []
        for v in value:
            ok, v2 = _type_ok(v, args[0]) if args else (True, v)
            if not ok:
                return False, value
            out.append(v2)
        return True, (tuple(out) if origin is tuple else out)
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    return True, value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``: unknown keys and wrong types raise :class:`UserError`."""
    if not isinstance(data, dict):
        raise UserError(f"config section '{where or cls.__name__}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f"; did you mean '{(where + '.') if where else ''}{close[0]}'?" if close else ""
            raise UserError(f"unknown config key '{path}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value or {}, path)
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise UserError(f"config key '{path}' expects {_type_name(tp)}, got {value!r}")
        kwargs[key] = coerced
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
            value = raw.strip()  # YAML 1.1 reads no/yes/on/off as booleans: keep the word (mixed_precision=no)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: '{p}' is not a section")
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing or malformed file is a :class:`UserError`. A shipped config
    (``configs/digits/dmd2.yaml``) is found from any folder, see :func:`diffdistill.paths.resolve_path`."""
    p = Path(resolve_path(str(path)))
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping at the top level")
    return data


def config_from_dict(data: dict) -> Config:
    """Validate a whole config dict, including the method's own section."""
    from .methods import METHOD_MODULES, get_method

    data = dict(data)
    method = data.get("method", Config.method)
    if method not in METHOD_MODULES:
        close = difflib.get_close_matches(str(method), sorted(METHOD_MODULES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown method {method!r}{hint} (choose {', '.join(sorted(METHOD_MODULES))})")
    section = data.pop(method, None) or {}
    for other in METHOD_MODULES:
        if other in data:
            raise UserError(f"config has a '{other}' section but method is '{method}'")
    data.pop("method_config", None)
    cfg = from_dict(Config, data)
    cfg.method_config = from_dict(get_method(method).Config, section, method)
    _one_guidance_scale(cfg, section)
    return cfg


def _one_guidance_scale(cfg: Config, section: dict) -> None:
    """``teacher.guidance_scale`` is the one source of truth for methods that guide the teacher: it fills
    the method's own ``guidance_scale`` unless that is set too, in which case the two must agree."""
    if not hasattr(cfg.method_config, "guidance_scale"):
        return
    if "guidance_scale" not in section:
        cfg.method_config.guidance_scale = cfg.teacher.guidance_scale
    elif cfg.method_config.guidance_scale != cfg.teacher.guidance_scale:
        raise UserError(f"{cfg.method}.guidance_scale={cfg.method_config.guidance_scale} disagrees with "
                        f"teacher.guidance_scale={cfg.teacher.guidance_scale}; set only teacher.guidance_scale")


def load_config(path: str | Path | None = None, overrides: Optional[list[str]] = None,
                base: Optional[dict] = None) -> Config:
    """Load a YAML config (or start from ``base``), apply ``--set`` overrides, validate."""
    data = read_yaml(path) if path is not None else dict(base or {})
    return config_from_dict(apply_overrides(data, overrides or []))


def config_to_yaml_dict(cfg: Config) -> dict:
    """The resolved config as saved in run folders and checkpoints (method section under its name)."""
    d = to_dict(cfg)
    d.pop("method_config")
    d[cfg.method] = to_dict(cfg.method_config)
    return d


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_yaml_dict(cfg), sort_keys=False))
