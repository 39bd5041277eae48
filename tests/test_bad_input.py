"""Every bad input a clear line (issue #16): one ``error:`` line on stderr, exit status 2, no traceback,
existing files byte-identical and no half-made run folder. One case per mistake a user can type."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from diffdistill.cli import main

REPO = Path(__file__).resolve().parents[1]
DMD2 = str(REPO / "configs/digits/dmd2.yaml")
TINY = ["--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "train.sample_every=0",
        "--set", "train.log_every=1", "--set", "train.checkpoint_every=2"]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse usage errors exit from inside main
        return int(e.code)


def _one_line(capsys, argv: list[str], match: str, progress: bool = False) -> str:
    """``main(argv)`` exits 2 with exactly one ``error:`` line on stderr that contains ``match`` (after the
    training progress bar, for a run that failed after it started: ``progress``)."""
    code = _run(argv)
    err = capsys.readouterr().err.strip()
    if progress:
        err = err.splitlines()[-1] if "it/s]" in err else err
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert match in err, err
    return err


@pytest.fixture(scope="module")
def dmd2_run(tmp_path_factory):
    """A 2-step DMD2 run on the shipped digits teacher (one checkpoint)."""
    run = tmp_path_factory.mktemp("bad_input") / "dmd2"
    assert main(["train", "--config", DMD2, "--output", str(run), *TINY]) == 0
    return run


# ------------------------------------------------------------------------------------------------
# 1. Every config key checked against what it allows, when the config loads
CONFIG_CASES = [
    # (config, --set, what the line must say)
    (DMD2, "train.steps=-5", "config key 'train.steps' must be >= 1, got -5"),
    (DMD2, "train.batch_size=0", "config key 'train.batch_size' must be >= 1, got 0"),
    (DMD2, "train.checkpoint_every=0", "config key 'train.checkpoint_every' must be >= 1, got 0"),
    (DMD2, "train.log_every=0", "config key 'train.log_every' must be >= 1, got 0"),
    (DMD2, "train.grad_accum=0", "config key 'train.grad_accum' must be >= 1"),
    (DMD2, "train.warmup_steps=-1", "config key 'train.warmup_steps' must be >= 0"),
    (DMD2, "train.ema_decay=2", "config key 'train.ema_decay' must be in [0, 1), got 2.0"),
    (DMD2, "train.lr=-1e-4", "config key 'train.lr' must be > 0, got -0.0001"),
    (DMD2, "train.lr_schedule=cosinus", "config key 'train.lr_schedule' must be one of linear, cosine"),
    (DMD2, "train.lr_schedule=cosinus", "did you mean 'cosine'?"),
    (DMD2, "train.mixed_precision=fp8", "config key 'train.mixed_precision' must be one of no, bf16, fp16"),
    (DMD2, "train.betas=[0.9]", "config key 'train.betas' must have 2 entries"),
    (DMD2, "train.betas=[0.9, 1.5]", "config key 'train.betas[1]' must be in [0, 1)"),
    (DMD2, "train.steps=lots", "config key 'train.steps' expects int, got 'lots'"),
    (DMD2, "teacher.dtype=float8", "config key 'teacher.dtype' must be one of float32, bfloat16, float16"),
    (DMD2, "teacher.guidance_scale=-1", "config key 'teacher.guidance_scale' must be >= 0"),
    (DMD2, "data.name=folders", "did you mean 'folder'?"),
    (DMD2, "data.resolution=0", "config key 'data.resolution' must be >= 1"),
    (DMD2, "data.channels=2", "config key 'data.channels' must be one of 1, 3, got 2"),
    (DMD2, "student.kind=tiny", "config key 'student.kind' must be one of copy, small, lora"),
    (DMD2, "student.steps=0", "config key 'student.steps' must be >= 1"),
    (DMD2, "student.renoise=ddpm", "config key 'student.renoise' must be one of fresh, ddim"),
    (DMD2, "student.small={block_out_channel: [16, 32]}",
     "unknown config key 'student.small.block_out_channel'; did you mean 'student.small.block_out_channels'?"),
    (DMD2, "train.stepz=3", "unknown config key 'train.stepz'; did you mean 'train.steps'?"),
    (DMD2, "method=disback", "method is 'disback' but the config's method section is 'dmd2:'"),
    (DMD2, "method=dmd3", "unknown method 'dmd3'; did you mean 'dmd2'?"),
    (DMD2, "dmd2.min_quantile=1.5", "config key 'dmd2.min_quantile' must be in [0, 1]"),
    (DMD2, "dmd2.dfake_gen_update_ratio=0", "config key 'dmd2.dfake_gen_update_ratio' must be >= 1"),
    (DMD2, "dmd2.gan_gen_weight=-1", "config key 'dmd2.gan_gen_weight' must be >= 0"),
    (DMD2, "dmd2.fake_weighting=edn", "did you mean 'edm'?"),
    (DMD2, "dmd2.lr=0", "config key 'dmd2.lr' must be > 0"),
    (str(REPO / "configs/digits/cd.yaml"), "cd.solver_steps=0", "config key 'cd.solver_steps' must be >= 1"),
    (str(REPO / "configs/digits/tscd.yaml"), "tscd.segments=[4, 0]", "config key 'tscd.segments[1]' must be >= 1"),
    (str(REPO / "configs/digits/tscd.yaml"), "tscd.solver=euler", "config key 'tscd.solver' must be one of ddim, heun"),
    (str(REPO / "configs/digits/ict.yaml"), "ict.loss=hubber", "did you mean 'huber'?"),
    (str(REPO / "configs/digits/ict.yaml"), "ict.dropout=1.5", "config key 'ict.dropout' must be in [0, 1]"),
    (str(REPO / "configs/digits/boot.yaml"), "boot.delta_ratio=0", "config key 'boot.delta_ratio' must be in (0, 1)"),
    (str(REPO / "configs/digits/disback.yaml"), "disback.degradation_lr_scale=2",
     "config key 'disback.degradation_lr_scale' must be in (0, 1]"),
    (str(REPO / "configs/digits/msd.yaml"), "msd.num_students=0", "config key 'msd.num_students' must be >= 1"),
    (str(REPO / "configs/digits/msd.yaml"), "msd.partition=kmean", "did you mean 'kmeans'?"),
]


@pytest.mark.parametrize("config, override, match", CONFIG_CASES, ids=[c[1] for c in CONFIG_CASES])
def test_config_value_outside_what_the_key_allows(tmp_path, capsys, config, override, match):
    out = tmp_path / "run"
    _one_line(capsys, ["train", "--config", config, "--output", str(out), "--set", override], match)
    assert not out.exists()


@pytest.mark.parametrize("override, match", [
    ("dsm.unet={block_out_channel: [8, 16]}", "did you mean 'dsm.unet.block_out_channels'?"),
    ("dsm.label_dropout=1.5", "config key 'dsm.label_dropout' must be in [0, 1]"),
    ("dsm.prediction_type=eps", "config key 'dsm.prediction_type' must be one of v_prediction, epsilon, sample"),
])
def test_teacher_train_config_checked_too(tmp_path, capsys, override, match):
    out = tmp_path / "teacher"
    _one_line(capsys, ["teacher", "train", "--config", str(REPO / "configs/digits/teacher.yaml"), "--output",
                       str(out), "--set", override], match)
    assert not out.exists()


def test_yaml_syntax_error_names_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: dmd2\ntrain:\n  steps: [1, 2\n  lr: 1\n")
    _one_line(capsys, ["train", "--config", str(bad), "--output", str(tmp_path / "run")], "line 4")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("how", ["--set", "yaml"])
def test_mixed_precision_no_is_the_word(tmp_path, how):
    from diffdistill.config import load_config

    if how == "--set":
        cfg = load_config(DMD2, ["train.mixed_precision=no"])
    else:
        text = (REPO / "configs/digits/dmd2.yaml").read_text().replace('mixed_precision: "no"', "mixed_precision: no")
        (tmp_path / "c.yaml").write_text(text)
        cfg = load_config(tmp_path / "c.yaml")
    assert cfg.train.mixed_precision == "no"


# ------------------------------------------------------------------------------------------------
# 2. The data against the teacher, before the first step
def _image_folder(root: Path, classes: int, mode: str, per_class: int = 2) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for c in range(classes):
        folder = root / f"c{c:02d}" if classes else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new(mode, (16, 16), color=(40 * i,) * (3 if mode == "RGB" else 1)).save(folder / f"{i}.png")
    if not classes:
        for i in range(per_class):
            Image.new(mode, (16, 16)).save(root / f"{i}.png")
    return root


@pytest.mark.parametrize("case", ["resolution", "rgb_folder", "too_many_classes", "no_labels"])
def test_data_that_does_not_fit_the_teacher(tmp_path, capsys, case):
    out = tmp_path / "run"
    folder = {"rgb_folder": (10, "RGB"), "too_many_classes": (12, "L"), "no_labels": (0, "L")}.get(case)
    overrides = ["--set", "data.name=folder", "--set", f"data.path={_image_folder(tmp_path / 'd', *folder)}",
                 "--set", "data.channels=null"] if folder else ["--set", "data.resolution=32"]
    match = {"resolution": "data.resolution=32 but the teacher assets/teachers/digits makes 16x16 images: set "
                           "data.resolution=16",
             "rgb_folder": "has 3-channel images but the teacher assets/teachers/digits makes 1-channel images: set "
                           "data.channels=1",
             "too_many_classes": "has 12 classes but the teacher assets/teachers/digits knows 10",
             "no_labels": "is class-conditional (10 classes) but the data"}[case]
    _one_line(capsys, ["train", "--config", DMD2, "--output", str(out), *TINY, *overrides], match)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# 3. The resume guard
def test_resume_of_a_folder_without_a_run(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line(capsys, ["train", "--config", DMD2, "--output", str(empty), "--resume", *TINY],
              f"--resume: {empty} holds no checkpoint")
    assert list(empty.iterdir()) == []
    typo = tmp_path / "dmd2-rnu"
    _one_line(capsys, ["train", "--config", DMD2, "--output", str(typo), "--resume", *TINY],
              f"--resume: {typo} does not exist")
    assert not typo.exists()


@pytest.mark.parametrize("config, overrides, match", [
    (str(REPO / "configs/digits/cd.yaml"), [], "differs from the one"),
    (DMD2, ["--set", "student.kind=small", "--set", "student.small={block_out_channels: [16, 32]}"],
     "in student.kind ('copy' -> 'small'), student.small"),
    (DMD2, ["--set", "train.lr=1e-3"], "in train.lr (0.0001 -> 0.001)"),
], ids=["other-method", "other-architecture", "other-lr"])
def test_resume_with_another_config_is_refused(dmd2_run, capsys, config, overrides, match):
    before = _snapshot(dmd2_run)
    err = _one_line(capsys, ["train", "--config", config, "--output", str(dmd2_run), "--resume", *TINY, *overrides],
                    match)
    assert "train.steps" in err  # and says which keys may change
    if "cd.yaml" in config:
        assert "method ('dmd2' -> 'cd')" in err
    assert _snapshot(dmd2_run) == before


def test_resume_safe_keys_are_not_differences(dmd2_run):
    from diffdistill.config import load_config
    from diffdistill.training.guards import RESUME_SAFE_KEYS, config_differences

    saved = yaml.safe_load((dmd2_run / "config.yaml").read_text())
    same = load_config(DMD2, [t for t in TINY if t != "--set"] + [f"output_dir={dmd2_run}"])
    assert config_differences(saved, same) == []
    changed = load_config(DMD2, [t for t in TINY if t != "--set"] + [
        "output_dir=elsewhere", "train.steps=10", "train.checkpoint_every=5", "train.keep_checkpoints=1",
        "train.sample_every=5", "train.log_every=5"])
    assert config_differences(saved, changed) == []
    assert set(RESUME_SAFE_KEYS) == {"output_dir", "train.steps", "train.checkpoint_every", "train.keep_checkpoints",
                                     "train.sample_every", "train.log_every"}


def test_weights_of_another_architecture_are_one_line(tmp_path):
    import torch
    from safetensors.torch import save_file

    from diffdistill.checkpoint_io import load_network
    from diffdistill.errors import UserError

    save_file({"weight": torch.zeros(4, 3), "bias": torch.zeros(4)}, str(tmp_path / "net.safetensors"))
    with pytest.raises(UserError, match=r"2 tensor\(s\) have other shapes, e.g. bias \(4,\) in the file, \(8,\) in"):
        load_network(torch.nn.Linear(2, 8), tmp_path / "net.safetensors")


# ------------------------------------------------------------------------------------------------
# 4. No half-made run folders
def _failing_first_step(monkeypatch, at_step: int = 0):
    from diffdistill.errors import UserError
    from diffdistill.training.stepper import Stepper

    real = Stepper.step

    def step(self, batches, step):
        if step >= at_step:
            raise UserError(f"boom at step {step + 1}")
        return real(self, batches, step)

    monkeypatch.setattr(Stepper, "step", step)


def test_a_run_that_fails_before_its_first_checkpoint_removes_its_folder(tmp_path, capsys, monkeypatch):
    _failing_first_step(monkeypatch)
    out = tmp_path / "new" / "run"
    _one_line(capsys, ["train", "--config", DMD2, "--output", str(out), *TINY], "boom at step 1", progress=True)
    assert not (tmp_path / "new").exists()  # the parent it made too
    mine = tmp_path / "mine"  # a folder the user had, with a file in it: both stay, nothing else
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    _one_line(capsys, ["train", "--config", DMD2, "--output", str(mine), *TINY], "boom at step 1", progress=True)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


def test_a_run_that_fails_after_its_first_checkpoint_keeps_it(tmp_path, capsys, monkeypatch):
    _failing_first_step(monkeypatch, at_step=1)
    out = tmp_path / "run"
    _one_line(capsys, ["train", "--config", DMD2, "--output", str(out), *TINY, "--set", "train.checkpoint_every=1"],
              "boom at step 2", progress=True)
    assert (out / "checkpoints" / "step-0000001" / "meta.json").is_file()


# ------------------------------------------------------------------------------------------------
# 5. Command-line numbers, and checkpoints that are not whole
NUMBER_CASES = [
    ["sample", "--checkpoint", "RUN", "--num-samples", "4", "--out", "OUT", "--steps", "0"],
    ["sample", "--checkpoint", "RUN", "--num-samples", "4", "--out", "OUT", "--batch-size", "0"],
    ["sample", "--checkpoint", "RUN", "--num-samples", "0", "--out", "OUT"],
    ["sample", "--checkpoint", "RUN", "--num-samples", "four", "--out", "OUT"],
    ["eval", "fid", "--checkpoint", "RUN", "--num-samples", "10", "--out", "OUT/f.json", "--steps", "0"],
    ["eval", "fid", "--checkpoint", "RUN", "--num-samples", "-1", "--out", "OUT/f.json"],
    ["eval", "fid", "--checkpoint", "RUN", "--num-samples", "10", "--out", "OUT/f.json", "--batch-size", "0"],
    ["eval", "clip", "--checkpoint", "RUN", "--prompts", "P", "--out", "OUT/c.json", "--steps", "0"],
    ["eval", "clip", "--checkpoint", "RUN", "--prompts", "P", "--out", "OUT/c.json", "--batch-size", "0"],
    ["export", "--checkpoint", "RUN", "--out", "OUT", "--steps", "0"],
    ["quickstart", "--output", "OUT", "--steps", "0"],
]


@pytest.mark.parametrize("argv", NUMBER_CASES, ids=[" ".join(a[:2]) + " " + " ".join(a[-2:]) for a in NUMBER_CASES])
def test_command_line_numbers_below_one(dmd2_run, tmp_path, capsys, argv):
    out = tmp_path / "out"
    argv = [str(dmd2_run) if a == "RUN" else a.replace("OUT", str(out)) for a in argv]
    before = _snapshot(dmd2_run)
    _one_line(capsys, argv, ">= 1")
    assert not out.exists() and _snapshot(dmd2_run) == before


@pytest.mark.parametrize("case", ["run-folder", "checkpoint-folder"])
def test_checkpoint_without_meta_json_says_so(dmd2_run, tmp_path, capsys, case):
    run = tmp_path / "run"
    shutil.copytree(dmd2_run, run)
    ckpt = run / "checkpoints" / "step-0000002"
    (ckpt / "meta.json").unlink()
    if case == "checkpoint-folder":
        shutil.rmtree(ckpt / "student")
    target = run if case == "run-folder" else ckpt
    before = _snapshot(run)
    err = _one_line(capsys, ["sample", "--checkpoint", str(target), "--num-samples", "2", "--out",
                             str(tmp_path / "s")], "meta.json")
    assert "unet/config.json" not in err
    assert _snapshot(run) == before and not (tmp_path / "s").exists()


def test_a_bad_config_leaves_an_existing_run_byte_identical(dmd2_run, capsys):
    before = _snapshot(dmd2_run)
    _one_line(capsys, ["train", "--config", DMD2, "--output", str(dmd2_run), "--resume", "--set", "train.lr=-1"],
              "config key 'train.lr' must be > 0")
    assert _snapshot(dmd2_run) == before


# ------------------------------------------------------------------------------------------------
# The schema behind the checks is what `diffdistill config show` prints
@pytest.mark.parametrize("method", [None, "dmd2", "ict", "cd", "tscd", "boot", "disback", "msd", "dsm"])
def test_config_show_lists_every_key_with_type_default_allowed_and_doc(capsys, method):
    from diffdistill.config import Config
    from diffdistill.methods import get_method
    from diffdistill.schema import schema_rows

    assert main(["config", "show"] + ([method] if method else [])) == 0
    text = capsys.readouterr().out
    rows = schema_rows(Config, skip=("method_config",))
    if method:
        rows += schema_rows(get_method(method).Config, prefix=f"{method}.")
    shown = {line.split()[0] for line in text.splitlines() if line and not line.startswith(" ")}
    assert [r[0] for r in rows if r[0] not in shown] == []
    assert [r[0] for r in rows if not r[4]] == []  # every key has its one-line doc
    steps = next(line for line in text.splitlines() if line.startswith("train.steps "))
    assert steps.split()[1:4] == ["int", "1000", ">="] and "optimisation steps" in steps


def test_config_show_of_an_unknown_method(capsys):
    _one_line(capsys, ["config", "show", "dmd3"], "unknown method 'dmd3'; did you mean 'dmd2'?")
