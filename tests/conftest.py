"""Shared fixtures: a tiny teacher-training config on 8-px digits, and a tiny trained teacher folder."""

from __future__ import annotations


import pytest
import torch
import yaml

# One thread: on a loaded 2-core machine two OpenMP threads per process made tiny-model tests ~40x slower.
torch.set_num_threads(1)

TINY_UNET = {"block_out_channels": [8, 16], "layers_per_block": 1,
             "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
             "norm_num_groups": 4, "attention_head_dim": 8}


@pytest.fixture
def isolated_cache(tmp_path_factory, monkeypatch):
    """One diffdistill cache for the session (the digits classifier trains once) and an empty torch hub."""
    monkeypatch.setenv("DIFFDISTILL_CACHE", str(tmp_path_factory.getbasetemp() / "diffdistill-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch-home-empty"))


def tiny_teacher_config(out, steps: int = 40, **train) -> dict:
    """A teacher-training (dsm) config on 8-px digits that runs a step in milliseconds."""
    t = {"steps": steps, "batch_size": 16, "seed": 0, "lr": 1e-3, "checkpoint_every": 20, "sample_every": 0,
         "log_every": 10, "ema_decay": 0.9, "warmup_steps": 5}
    t.update(train)
    return {"method": "dsm", "output_dir": str(out), "data": {"name": "digits", "resolution": 8},
            "train": t, "dsm": {"unet": TINY_UNET}}


def one_and_two_processes(repo) -> tuple[dict, list[tuple[str, list[str]]]]:
    """``(env, [("one", argv), ("two", argv)])``: ``python -m diffdistill`` on one process and under
    ``torchrun --nproc_per_node 2`` (one thread each); skips the test when torchrun is missing."""
    import os
    import shutil
    import sys

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    return env, [("one", [sys.executable, "-m", "diffdistill"]),
                 ("two", ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "diffdistill"])]


def run_launch(argv: list[str], env: dict) -> None:
    """Run a CLI launch (one process or torchrun); on failure, fail the test with the end of its stderr, where
    each rank's traceback is (pytest's CalledProcessError repr cuts it to a few characters)."""
    import subprocess

    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}; stderr ends:\n{proc.stderr[-6000:]}",
                    pytrace=False)


def write_config(path, data: dict):
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def tiny_teacher_run(tmp_path_factory):
    """A run folder of a 40-step tiny teacher (with its exported ``teacher/`` folder)."""
    from diffdistill.config import config_from_dict
    from diffdistill.training.loop import train

    out = tmp_path_factory.mktemp("tiny_teacher") / "run"
    return train(config_from_dict(tiny_teacher_config(out)))
