"""Digits FID of trained runs (and the shipped teacher) at several step counts, as one table.

    PYTHONPATH=. python benchmarks/digits_fid.py runs/digits-dmd2 runs/digits-boot --steps 1 2 4 --num-samples 2000

Each run is evaluated at each step count it supports (a step count a student cannot do is skipped);
a progressive run that kept one student per stage (TSCD: RUN/stages/steps-K) is sampled at K steps with
its K-segment stage student (``load_generator(run, steps=K)``). The teacher row uses the Heun solver
(NFE = 2 steps - 1). Class accuracy: the digits classifier's argmax equals the requested label, on as many
class-balanced samples drawn with another seed. Prints a markdown table.
"""

from __future__ import annotations

import argparse

import torch

from diffdistill.errors import UserError
from diffdistill.generator import load_generator
from diffdistill.metrics import DigitsFeatures, digits_ref_stats, evaluate_fid
from diffdistill.training.build import DEFAULT_TEACHER, resolve_path


@torch.no_grad()
def class_accuracy(gen, ext: DigitsFeatures, num_samples: int, steps: int, seed: int) -> float:
    """Fraction of class-balanced samples (label i mod 10) the digits classifier reads as their label."""
    if not gen.num_classes:
        return float("nan")
    labels = torch.arange(num_samples) % gen.num_classes
    hits = 0
    for start in range(0, num_samples, 500):
        x = gen.sample(min(500, num_samples - start), steps=steps, seed=seed, offset=start)
        logits = ext.model.head(torch.relu(ext(x)))  # DigitsCNN.forward after the extractor's resizing
        hits += int((logits.argmax(1) == labels[start:start + len(x)]).sum())
    return hits / num_samples


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
        for k in steps:
            gen = load_generator(path, device="cpu", steps=k)  # a TSCD run: its K-segment stage student
            try:
                r = evaluate_fid(gen, ext, ref, args.num_samples, steps=k, batch_size=500, seed=args.seed, progress=False)
            except UserError as e:
                print(f"skip {name} at {k} steps: {e}")
                continue
            acc = class_accuracy(gen, ext, args.num_samples, k, args.seed + 1)
            rows.append((name, k, r["nfe"], r["fid"], acc, r["precision"], r["recall"], r["seconds_per_image"]))
            print(f"{name} steps={k} fid={r['fid']:.3f} accuracy={acc:.3f}", flush=True)
    print(f"\ndigits FID, {args.num_samples} class-balanced samples, classifier test accuracy {ext.test_accuracy:.4f}\n")
    print("| model | steps | NFE | digits FID | class accuracy | precision | recall | s/image |")
    print("|---|---|---|---|---|---|---|---|")
    for name, k, nfe, fid, acc, p, rc, spi in rows:
        print(f"| {name} | {k} | {nfe} | {fid:.3f} | {acc:.3f} | {p:.3f} | {rc:.3f} | {spi:.5f} |")


if __name__ == "__main__":
    main()
