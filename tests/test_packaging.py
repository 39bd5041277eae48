"""The shipped teacher and configs travel inside the installed package: a wheel works from any folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import diffdistill
from diffdistill.paths import DEFAULT_TEACHER, resolve_path, shipped_config

REPO = Path(__file__).resolve().parents[1]
TEACHER_FILES = ("config.json", "scheduler_config.json", "diffdistill.json", "diffusion_pytorch_model.safetensors",
                 "README.md")


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a command and return its result (the caller asserts on the exit status and output)."""
    return subprocess.run(args, check=False, capture_output=True, text=True, **kw)


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_resolve_path_finds_shipped_files_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(resolve_path("configs/digits/dmd2.yaml")).is_file()
    teacher = Path(resolve_path(DEFAULT_TEACHER))
    assert teacher.is_dir() and all((teacher / f).is_file() for f in TEACHER_FILES)
    assert Path(shipped_config("digits/dmd2")) == Path(resolve_path("configs/digits/dmd2.yaml"))
    # unknown or non-shipped names come back unchanged (the caller reports them)
    assert resolve_path("configs/digits/nope.yaml") == "configs/digits/nope.yaml"
    assert resolve_path("runs/x") == "runs/x" and resolve_path("") == ""
    # a file of the same name in the working directory wins
    local = tmp_path / "configs" / "digits" / "dmd2.yaml"
    local.parent.mkdir(parents=True)
    local.write_text("method: dmd2\n")
    assert resolve_path("configs/digits/dmd2.yaml") == "configs/digits/dmd2.yaml"


def test_load_config_reads_a_shipped_config_from_any_folder(tmp_path, monkeypatch):
    from diffdistill.config import load_config

    monkeypatch.chdir(tmp_path)
    assert load_config("configs/digits/dmd2.yaml").method == "dmd2"


def test_version_flag(tmp_path):
    from importlib.metadata import version

    r = _run([sys.executable, "-m", "diffdistill", "--version"], cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"diffdistill {version('diffdistill')}"


def test_paths_module_is_light(tmp_path):
    code = "import sys, diffdistill.paths; sys.exit('torch' in sys.modules or 'diffdistill.training' in sys.modules)"
    r = _run([sys.executable, "-c", code], cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr


def test_pyproject_lists_every_subpackage_and_maps_the_shipped_folders():
    data = _pyproject()
    assert data["project"]["version"] == diffdistill.__version__
    st = data["tool"]["setuptools"]
    packages = set(st["packages"])
    on_disk = {".".join(p.relative_to(REPO).parts) for p in (REPO / "diffdistill").rglob("*")
               if p.is_dir() and p.name != "__pycache__" and any(p.glob("*.py"))} | {"diffdistill"}
    missing = on_disk - packages
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"
    assert st["package-dir"] == {"diffdistill._configs": "configs", "diffdistill._assets": "assets"}


@pytest.mark.slow
def test_wheel_works_from_an_empty_folder(tmp_path):
    if not (REPO / "pyproject.toml").is_file():
        pytest.skip("needs the source checkout")
    # build from a copy, so the checkout gets no build/ folder and no stale build/lib leaks into the wheel
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("diffdistill", "configs", "assets"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    wheels = tmp_path / "wheels"
    r = _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)],
             cwd=src, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = wheels.glob("diffdistill-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "diffdistill/_configs/digits/dmd2.yaml" in names
    for cfg in (REPO / "configs").rglob("*.yaml"):
        assert f"diffdistill/_configs/{cfg.relative_to(REPO / 'configs').as_posix()}" in names
    for f in TEACHER_FILES:
        assert f"diffdistill/_assets/teachers/digits/{f}" in names

    site = tmp_path / "site"
    r = _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "DIFFDISTILL_CACHE": str(tmp_path / "cache")}
    # drop the editable install's finder (if any), so nothing can be served from the checkout
    prelude = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
               "if '__editable__' not in getattr(f, '__module__', '')]; ")
    code = prelude + ("import diffdistill; from diffdistill.paths import resolve_path; "
                      "print(diffdistill.__file__); print(resolve_path('configs/digits/dmd2.yaml')); "
                      "print(resolve_path('assets/teachers/digits'))")
    r = _run([sys.executable, "-c", code], cwd=empty, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    for line in r.stdout.split():
        assert Path(line).resolve().is_relative_to(site.resolve()), r.stdout

    # the quickstart, run as `python -m diffdistill`, with every diffdistill module loaded from the wheel
    run = prelude + (
        "import runpy; sys.argv = ['diffdistill', 'quickstart', '--output', 'out', '--steps', '4', "
        "'--num-samples', '20']\n"
        "try:\n    runpy.run_module('diffdistill', run_name='__main__', alter_sys=True)\n"
        "finally:\n"
        f"    bad = [n for n, m in list(sys.modules.items()) if n.startswith('diffdistill') and "
        f"getattr(m, '__file__', None) and not m.__file__.startswith({str(site)!r})]\n"
        "    print('OUTSIDE THE WHEEL:', bad) if bad else None\n")
    r = _run([sys.executable, "-c", run], cwd=empty, env=env, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "OUTSIDE THE WHEEL" not in r.stdout, r.stdout[-2000:]
    report = json.loads((empty / "out" / "report.json").read_text())
    assert len(report["rows"]) == 3
