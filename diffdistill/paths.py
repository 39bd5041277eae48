"""Where the shipped teacher and configs live, for a source checkout, an editable install and a wheel.

The repository keeps ``configs/`` and ``assets/`` at its top level; ``pyproject.toml`` maps them into the package
at build time as ``diffdistill._configs`` and ``diffdistill._assets``, so a wheel carries them. :func:`resolve_path`
turns the repository-relative names used everywhere (``configs/digits/dmd2.yaml``, ``assets/teachers/digits``)
into real paths from any working directory. Light on purpose: no torch, nothing from ``diffdistill.training``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from importlib.resources import files
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from .errors import UserError

DEFAULT_TEACHER = "assets/teachers/digits"

# the source checkout this module sits in (meaningful only when it holds pyproject.toml, i.e. not for a wheel)
REPO_ROOT = Path(__file__).resolve().parents[1]

# top-level repository folder -> the package it is installed as (see [tool.setuptools.package-dir])
SHIPPED_PACKAGES = {"configs": "diffdistill._configs", "assets": "diffdistill._assets"}


def _from_package(rel: PurePosixPath) -> Path | None:
    """``rel`` (``configs/...`` or ``assets/...``) inside the installed package data, if it is there.

    In a wheel install ``diffdistill._configs`` is a real folder of the package. In setuptools' editable install
    it cannot be imported (its finder does not serve a namespace subpackage mapped outside the package folder),
    so this returns None and :func:`resolve_path` falls back to the repository root, which is the checkout."""
    package = SHIPPED_PACKAGES.get(rel.parts[0])
    if package is None or len(rel.parts) < 2:
        return None
    try:
        node = files(package)
        for part in rel.parts[1:]:
            node = node.joinpath(part)
        candidate = Path(str(node))
    except (ImportError, TypeError, ValueError, AttributeError, NotImplementedError):
        return None
    return candidate if candidate.exists() else None


def _from_checkout(rel: PurePosixPath) -> Path | None:
    """``rel`` under the repository root, when this module runs from a source checkout (or an editable install)."""
    if not (REPO_ROOT / "pyproject.toml").is_file():
        return None
    candidate = REPO_ROOT / rel
    return candidate if candidate.exists() else None


def resolve_path(path: str) -> str:
    """A path that exists from the working directory is returned as is. Otherwise a relative ``configs/...`` or
    ``assets/...`` path is looked up in the installed package data, then in the repository root (a source checkout
    run without installing); anything else, or a shipped name that is found nowhere, is returned unchanged."""
    if not path:
        return path
    p = Path(path)
    if p.is_absolute() or p.exists():
        return path
    rel = PurePosixPath(p.as_posix())
    if not rel.parts or rel.parts[0] not in SHIPPED_PACKAGES or ".." in rel.parts:
        return path
    found = _from_package(rel) or _from_checkout(rel)
    return str(found) if found is not None else path


def shipped_config(name: str) -> str:
    """The path of a shipped config: ``shipped_config("digits/dmd2")`` (``.yaml`` optional, ``configs/`` too)."""
    rel = name if name.startswith("configs/") else f"configs/{name}"
    if not rel.endswith((".yaml", ".yml")):
        rel += ".yaml"
    found = resolve_path(rel)
    if not Path(found).is_file():
        raise UserError(f"no shipped config {name!r} (looked for {rel} in the installed package and the checkout)")
    return found


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``dest`` to write a whole folder into. On success it takes ``dest``'s place
    (an existing ``dest`` is moved aside first and removed after, so readers see the old folder or the new
    one, never half of either); on any failure the temporary folder is removed and ``dest`` is untouched."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def atomic_file(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` into a temporary sibling of ``path``, flush it to disk, then move it onto ``path``: another
    process (a second DDP rank, a reader of a run folder) sees no file or the whole new one, never a half-written
    one. On any failure the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


__all__ = ["DEFAULT_TEACHER", "REPO_ROOT", "SHIPPED_PACKAGES", "atomic_file", "atomic_folder", "resolve_path",
           "shipped_config"]
