"""Text alignment and digits FID of the digits text-to-image teacher and its students, as one table.

    python benchmarks/digits_text.py                                   # the shipped teacher, 40 Heun steps
    python benchmarks/digits_text.py --teacher-steps 0 --run dmd2=runs/digits-text-dmd2 \\
        --run tscd=runs/digits-text-tscd --run boot=runs/digits-text-boot --steps 1

For each model: samples prompted with the 8 *held-out* phrasings per digit ("an image showing a seven",
"digit seven written by hand", ...; never used in training), class-balanced (sample ``i`` asks for digit
``i mod 10``), scored by the project's digit classifier (class accuracy) and the digits FID of the same
samples against all 1,797 digits; plus the class accuracy on the 16 training phrasings
(:func:`diffdistill.metrics.prompted_class_accuracy`). ``--steps`` applies to the runs (a TSCD run gives
the stage student trained for that many steps). Prints a markdown table; ``--json FILE`` saves the rows.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from diffdistill.data.digits_text import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, class_phrasings
from diffdistill.generator import load_generator
from diffdistill.metrics import DigitsFeatures, prompted_class_accuracy
from diffdistill.paths import resolve_path

TEACHER = "assets/teachers/digits_text"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=TEACHER)
    ap.add_argument("--teacher-steps", type=int, nargs="+", default=[40], help="0 skips the teacher")
    ap.add_argument("--guidance-scale", type=float, default=1.0, help="the teacher's CFG scale")
    ap.add_argument("--run", action="append", default=[], metavar="NAME=PATH", help="a student run (repeatable)")
    ap.add_argument("--steps", type=int, nargs="+", default=[1], help="sampling steps of the runs")
    ap.add_argument("--num-samples", type=int, default=2000, help="held-out-phrasing samples (FID + accuracy)")
    ap.add_argument("--train-samples", type=int, default=800, help="training-phrasing samples (accuracy only)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ext = DigitsFeatures()
    heldout, train = class_phrasings(HELDOUT_TEMPLATES), class_phrasings(TRAIN_TEMPLATES)
    jobs = [(f"teacher (heun, w={args.guidance_scale:g})", resolve_path(args.teacher), k, args.guidance_scale)
            for k in args.teacher_steps if k > 0]
    for spec in args.run:
        name, _, path = spec.partition("=")
        jobs += [(name, path, k, None) for k in args.steps]
    rows = []
    for name, path, steps, w in jobs:
        t0 = time.perf_counter()
        gen = load_generator(path, device="cpu", guidance_scale=w, steps=steps)
        held = prompted_class_accuracy(gen, heldout, args.num_samples, steps=steps, seed=args.seed, with_fid=True,
                                       extractor=ext)
        seen = prompted_class_accuracy(gen, train, args.train_samples, steps=steps, seed=args.seed + 1, extractor=ext)
        row = {"model": name, "path": path, "steps": steps, "nfe": held["nfe"], "fid_heldout": held["fid"],
               "acc_heldout": held["accuracy"], "acc_train": seen["accuracy"], "worst_class_heldout":
               min(held["per_class"]), "per_phrasing_heldout": held["per_phrasing"],
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{name} steps={steps}: FID {held['fid']:.3f}, accuracy held-out {held['accuracy']:.4f} / training "
              f"{seen['accuracy']:.4f} ({row['seconds']:.0f} s)", flush=True)
    print(f"\nheld-out phrasings: {args.num_samples} class-balanced samples (FID + accuracy); training phrasings: "
          f"{args.train_samples} samples; digit classifier test accuracy {ext.test_accuracy:.4f}\n")
    print("| model | steps | NFE | digits FID (held-out prompts) | class acc. held-out | worst class "
          "| class acc. training |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['steps']} | {r['nfe']} | {r['fid_heldout']:.3f} | {r['acc_heldout']:.4f} | "
              f"{r['worst_class_heldout']:.3f} | {r['acc_train']:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"num_samples": args.num_samples, "train_samples": args.train_samples, "seed": args.seed,
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
