"""Command line: sampling from teachers, and every user mistake is one line with exit status 2."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from diffdistill.cli import main
from tests.conftest import tiny_teacher_config, write_config


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_sample_teacher_writes_pngs_and_grid(tmp_path, tiny_teacher_run):
    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", str(tiny_teacher_run / "teacher"), "--num-samples", "5", "--steps", "3",
                 "--out", str(out), "--labels", "3,7"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.png" for i in range(5)] + ["grid.png"]
    # and never over existing samples
    assert main(["sample", "--checkpoint", str(tiny_teacher_run), "--num-samples", "2", "--out", str(out)]) == 2


def test_sample_without_num_samples_draws_one_per_listed_label(tmp_path, tiny_teacher_run, capsys):
    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", str(tiny_teacher_run / "teacher"), "--steps", "2", "--out", str(out),
                 "--labels", "3,7,1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.png" for i in range(3)] + ["grid.png"]
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(tiny_teacher_run / "teacher"), "--out", str(tmp_path / "o")]) == 2
    assert "--num-samples is required" in _one_line_error(capsys)


@pytest.mark.parametrize("override, match", [
    ("train.stepz=3", "unknown config key 'train.stepz'; did you mean 'train.steps'?"),
    ("train.steps=lots", "config key 'train.steps' expects int"),
])
def test_bad_config_exits_2_and_changes_nothing(tmp_path, capsys, tiny_teacher_run, override, match):
    cfg = write_config(tmp_path / "c.yaml", tiny_teacher_config(tiny_teacher_run))
    before = _snapshot(tiny_teacher_run)
    assert main(["teacher", "train", "--config", str(cfg), "--set", override, "--resume"]) == 2
    assert match in _one_line_error(capsys)
    assert _snapshot(tiny_teacher_run) == before


def test_missing_teacher_folder_exits_2(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", {"method": "dmd2", "output_dir": str(tmp_path / "run"),
                                             "teacher": {"path": str(tmp_path / "no_such_teacher")}})
    assert main(["train", "--config", str(cfg)]) == 2
    assert "no_such_teacher" in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_corrupt_safetensors_exits_2_and_changes_nothing(tmp_path, capsys, tiny_teacher_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_teacher_run, run)
    bad = run / "checkpoints" / "step-0000040" / "student" / "denoiser.safetensors"  # the artefact sampling reads
    bad.write_bytes(bad.read_bytes()[:100])
    before = _snapshot(run)
    assert main(["sample", "--checkpoint", str(run), "--num-samples", "2", "--out", str(tmp_path / "o")]) == 2
    err = _one_line_error(capsys)
    assert "corrupt safetensors file" in err and "denoiser.safetensors" in err
    assert _snapshot(run) == before


def test_unknown_label_and_usage_errors(tmp_path, capsys, tiny_teacher_run):
    args = ["sample", "--checkpoint", str(tiny_teacher_run / "teacher"), "--num-samples", "2", "--out", str(tmp_path / "o")]
    assert main(args + ["--labels", "12"]) == 2
    assert "unknown class label 12" in _one_line_error(capsys)
    with pytest.raises(SystemExit) as e:
        main(["sample", "--num-samples", "2"])
    assert e.value.code == 2
    _one_line_error(capsys)


def test_export_writes_a_diffusers_folder_that_samples_the_same(tmp_path, capsys, tiny_teacher_run):
    from diffusers import UNet2DModel

    from diffdistill.generator import load_generator

    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(tiny_teacher_run), "--out", str(out)]) == 0
    assert UNet2DModel.from_pretrained(out, subfolder="unet").config.num_class_embeds == 11
    assert "DDIMScheduler" in (out / "README.md").read_text()
    a = load_generator(out, device="cpu").sample(3, steps=2, seed=4)
    b = load_generator(tiny_teacher_run, device="cpu").sample(3, steps=2, seed=4)
    assert torch.allclose(a, b, atol=1e-5)
    assert main(["export", "--checkpoint", str(tiny_teacher_run), "--out", str(out)]) == 2  # never over a folder
    assert "not empty" in _one_line_error(capsys)
