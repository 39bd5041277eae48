"""``diffdistill quickstart``: shipped digits teacher -> one-step DMD2 student -> samples -> FID table.

Writes into the output folder: ``dmd2/`` (the run: checkpoints, sample grids, logs), ``teacher_grid.png``,
``student_grid.png`` and ``report.json``; prints the table. Re-running resumes / reuses the finished run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from .errors import UserError

TEACHER_STEPS = 40


def _table(rows: list[dict]) -> str:
    head = f"{'model':<8} {'method':<8} {'steps':>5} {'nfe':>4} {'digits FID':>11} {'s/image':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<8} {r['method']:<8} {r['steps']:>5} {r['nfe']:>4} {r['fid']:>11.3f} "
                     f"{r['seconds_per_image']:>9.5f}")
    return "\n".join(lines)


def run_quickstart(output: str = "runs/quickstart", steps: Optional[int] = None, num_samples: int = 2000,
                   config: str = "configs/digits/dmd2.yaml") -> dict:
    """Train (or resume) the default DMD2 run and evaluate teacher and student; returns the report."""
    from .config import load_config
    from .generator import load_generator, save_grid
    from .metrics import DigitsFeatures, digits_ref_stats, evaluate_fid
    from .training.build import DEFAULT_TEACHER, resolve_path
    from .training.checkpoints import latest_checkpoint, read_meta
    from .training.loop import train

    if num_samples < 10:
        raise UserError(f"--num-samples must be >= 10, got {num_samples}")
    out = Path(output)
    run = out / "dmd2"
    overrides = [f"output_dir={run}"] + ([f"train.steps={steps}"] if steps else [])
    cfg = load_config(resolve_path(config), overrides)
    t0 = time.perf_counter()
    last = latest_checkpoint(run)
    if last is None or read_meta(last)["step"] < cfg.train.steps:
        print(f"[1/3] distilling {cfg.teacher.path} with DMD2 for {cfg.train.steps} steps -> {run}")
        train(cfg, resume=last is not None)
    else:
        print(f"[1/3] reusing the finished run in {run}")
    train_seconds = time.perf_counter() - t0

    print("[2/3] sampling")
    teacher = load_generator(resolve_path(DEFAULT_TEACHER))
    student = load_generator(run)
    save_grid(teacher.sample(100, steps=TEACHER_STEPS, seed=0), out / "teacher_grid.png")
    save_grid(student.sample(100, seed=0), out / "student_grid.png")

    print(f"[3/3] digits FID on {num_samples} class-balanced samples")
    extractor = DigitsFeatures()
    ref = digits_ref_stats(extractor)
    rows = []
    for model, gen, k in (("teacher", teacher, 1), ("teacher", teacher, TEACHER_STEPS), ("student", student, 1)):
        r = evaluate_fid(gen, extractor, ref, num_samples, steps=k, batch_size=500, seed=1, progress=True)
        rows.append({"model": model, "method": "heun" if model == "teacher" else cfg.method, "steps": k,
                     "nfe": r["nfe"], "fid": r["fid"], "seconds_per_image": r["seconds_per_image"],
                     "precision": r["precision"], "recall": r["recall"]})
    report = {"features": extractor.info(), "num_samples": num_samples, "rows": rows,
              "train_steps": cfg.train.steps, "train_seconds": train_seconds,
              "total_seconds": time.perf_counter() - t0, "run": str(run)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(_table(rows))
    print(f"digits classifier test accuracy {extractor.test_accuracy:.4f}; report: {out / 'report.json'}")
    return report
