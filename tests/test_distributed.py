"""Several processes: disjoint shards whose union is the one-process batch, the same noise, and a real
two-process torchrun run whose losses match the one-process run."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from diffdistill.training.batches import BatchSource
from tests.conftest import run_launch, tiny_teacher_config, write_config


class _Data:
    def __init__(self, n):
        self.images = torch.arange(n, dtype=torch.float32).view(n, 1)
        self.labels = torch.arange(n) % 10

    def __len__(self):
        return len(self.images)


def test_processes_get_disjoint_shards_and_the_same_noise():
    data = _Data(100)
    one = BatchSource(data, None, 10, 8, 0, 1, seed=3, device=torch.device("cpu"))(step=5)
    parts = [BatchSource(data, None, 10, 8, r, 2, seed=3, device=torch.device("cpu"))(step=5) for r in range(2)]
    ids = [p.images.flatten().tolist() for p in parts]
    assert not set(ids[0]) & set(ids[1])
    assert ids[0] + ids[1] == one.images.flatten().tolist()
    assert torch.equal(torch.cat([p.cond for p in parts]), one.cond)
    # per-sample noise is the one-process noise, sliced; other draws are shared by every process
    noise = torch.cat([p.randn((4, 3)) for p in parts])
    assert torch.equal(noise, one.randn((8, 3)))
    assert parts[0].randint(7, (1,)).item() == parts[1].randint(7, (1,)).item()


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    cfgs = {}
    for name in ("one", "two"):
        cfgs[name] = write_config(tmp_path / f"{name}.yaml",
                                  tiny_teacher_config(tmp_path / name, steps=20, log_every=5, ema_decay=0.0))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    run_launch([sys.executable, "-m", "diffdistill", "teacher", "train", "--config", str(cfgs["one"])], env)
    run_launch(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "diffdistill", "teacher", "train",
                "--config", str(cfgs["two"])], env)
    rows = {n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in cfgs}
    assert [r["step"] for r in rows["one"]] == [r["step"] for r in rows["two"]] == [5, 10, 15, 20]
    for a, b in zip(rows["one"], rows["two"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-5)
