"""Digits FID of trained runs (and the shipped teacher) at several step counts, as one table.

    PYTHONPATH=. python benchmarks/digits_fid.py runs/digits-dmd2 runs/digits-boot --steps 1 2 4 --num-samples 2000

Each run is evaluated at each step count it supports (a step count a student cannot do is skipped);
the teacher row uses the Heun solver (NFE = 2 steps - 1). Prints a markdown table.
"""

from __future__ import annotations

import argparse

import torch

from diffdistill.errors import UserError
from diffdistill.generator import load_generator
from diffdistill.metrics import DigitsFeatures, digits_ref_stats, evaluate_fid
from diffdistill.training.build import DEFAULT_TEACHER, resolve_path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="*")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--teacher-steps", type=int, nargs="+", default=[1, 40])
    ap.add_argument("--num-samples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ext = DigitsFeatures()
    ref = digits_ref_stats(ext)
    rows = []
    teacher_steps = [k for k in args.teacher_steps if k > 0]  # --teacher-steps 0 skips the teacher
    jobs = [("teacher (heun)", resolve_path(DEFAULT_TEACHER), teacher_steps)] if teacher_steps else []
    jobs += [(r, r, args.steps) for r in args.runs]
    for name, path, steps in jobs:
        gen = load_generator(path, device="cpu")
        for k in steps:
            try:
                r = evaluate_fid(gen, ext, ref, args.num_samples, steps=k, batch_size=500, seed=args.seed, progress=False)
            except UserError as e:
                print(f"skip {name} at {k} steps: {e}")
                continue
            rows.append((name, k, r["nfe"], r["fid"], r["precision"], r["recall"], r["seconds_per_image"]))
            print(f"{name} steps={k} fid={r['fid']:.3f}", flush=True)
    print(f"\ndigits FID, {args.num_samples} class-balanced samples, classifier test accuracy {ext.test_accuracy:.4f}\n")
    print("| model | steps | NFE | digits FID | precision | recall | s/image |")
    print("|---|---|---|---|---|---|---|")
    for name, k, nfe, fid, p, rc, spi in rows:
        print(f"| {name} | {k} | {nfe} | {fid:.3f} | {p:.3f} | {rc:.3f} | {spi:.5f} |")


if __name__ == "__main__":
    main()
