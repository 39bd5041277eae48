"""The README's main job end to end, at toy size: train a few DMD2 steps, sample, and write report.json."""

from __future__ import annotations

import json

import pytest

from diffdistill.training.build import DEFAULT_TEACHER, REPO_ROOT


@pytest.mark.slow
def test_quickstart_writes_report(tmp_path):
    if not (REPO_ROOT / DEFAULT_TEACHER / "config.json").is_file():
        pytest.fail(f"the shipped teacher {DEFAULT_TEACHER} is missing")
    from diffdistill.cli import main

    out = tmp_path / "qs"
    assert main(["quickstart", "--output", str(out), "--steps", "2", "--num-samples", "20"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["num_samples"] == 20 and report["features"]["name"] == "digits-cnn"
    rows = {(r["model"], r["steps"]): r for r in report["rows"]}
    assert set(rows) == {("teacher", 1), ("teacher", 40), ("student", 1)}
    assert rows[("teacher", 40)]["nfe"] == 79 and rows[("student", 1)]["nfe"] == 1
    assert all(r["fid"] >= 0 and r["seconds_per_image"] > 0 for r in report["rows"])
    # the 40-step teacher is far better than its own one-step output
    assert rows[("teacher", 40)]["fid"] < rows[("teacher", 1)]["fid"]
    assert (out / "teacher_grid.png").is_file() and (out / "student_grid.png").is_file()
    # a second call reuses the finished run instead of training again
    assert main(["quickstart", "--output", str(out), "--steps", "2", "--num-samples", "20"]) == 0
