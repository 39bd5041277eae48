"""MSD on the shipped digits teacher: K = 1 vs 2 vs 5 same-size students, and small students with and without
Teacher Score Matching, over seeds; prints one table (mean +- std over seeds, and each seed's value).

    PYTHONPATH=. python benchmarks/msd.py                       # the small default budget (see below)
    PYTHONPATH=. python benchmarks/msd.py --steps 1500 --num-samples 2000 --out runs/bench-msd-1500

Equal total generator updates: every run has the same ``train.steps`` and ``train.batch_size``; MSD updates
the routed generator once per generator turn on the whole batch (sample g -> student g mod K), so K = 1, 2, 5
make the same number of generator updates on the same number of samples (K = 1 is DMD2 with MSD's plumbing).
Small students (``configs/digits/msd_small.yaml``, 44% fewer parameters, K = ``--small-k``) run the same
number of iterations: with TSM, the first third is Teacher Score Matching, then DM, then DM + GAN from two
thirds; without TSM, DM from a random initialisation for the first two thirds, then DM + GAN.

Metrics on ``--num-samples`` class-balanced one-step samples: digits FID (the project's digits classifier
features against the digits dataset) and class accuracy (the classifier's argmax equals the requested label),
with the worst class. Runs are kept under ``--out`` and reused when the script is run again.
Default budget: 300 iterations per run, 3 seeds, 1000 samples: about 40 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from diffdistill.config import load_config
from diffdistill.generator import load_generator
from diffdistill.metrics import DigitsFeatures, digits_ref_stats, evaluate_fid
from diffdistill.paths import REPO_ROOT
from diffdistill.training.checkpoints import latest_checkpoint
from diffdistill.training.loop import final_losses, train


def jobs(args) -> list[tuple[str, str, list[str]]]:
    """(row name, config, overrides) of every run of one seed."""
    s = args.steps
    out = [(f"K={k} same size", "configs/digits/msd.yaml", [f"msd.num_students={k}"]) for k in args.ks]
    if args.small_k:
        k = args.small_k
        out += [(f"K={k} small, TSM", "configs/digits/msd_small.yaml",
                 [f"msd.num_students={k}", f"msd.tsm_steps={s // 3}", f"msd.gan_start_step={2 * s // 3}"]),
                (f"K={k} small, no TSM", "configs/digits/msd_small.yaml",
                 [f"msd.num_students={k}", "msd.tsm_steps=0", f"msd.gan_start_step={2 * s // 3}"])]
    return out


@torch.no_grad()
def class_accuracy(gen, classifier, num_samples: int, seed: int) -> tuple[float, list[float]]:
    """Fraction of class-balanced samples (label i mod 10) the digits classifier reads as their label, and per class."""
    labels = torch.arange(num_samples) % 10
    images = gen.sample(num_samples, steps=1, seed=seed, batch_size=500)
    pred = classifier(images).argmax(1)
    per_class = [float((pred[labels == c] == c).float().mean()) for c in range(10)]
    return float((pred == labels).float().mean()), per_class


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="train.steps of every run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 5], help="numbers of same-size students")
    ap.add_argument("--small-k", type=int, default=2, help="K of the small-student rows (0 skips them)")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--eval-seed", type=int, default=1)
    ap.add_argument("--out", default="runs/bench-msd")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ext = DigitsFeatures()
    ref = digits_ref_stats(ext)
    results = []
    for name, config, overrides in jobs(args):
        for seed in args.seeds:
            run = Path(args.out) / f"{name.replace(' ', '_').replace(',', '')}-seed{seed}"
            cfg = load_config(REPO_ROOT / config, overrides=[
                *overrides, f"train.steps={args.steps}", f"train.seed={seed}", f"output_dir={run}",
                f"train.checkpoint_every={args.steps}", "train.sample_every=0", "train.log_every=50"])
            if latest_checkpoint(run) is None:
                train(cfg)
            seconds = final_losses(run)[-1]["seconds"]  # the loop's wall clock at its last log row
            gen = load_generator(run, device="cpu")
            fid = evaluate_fid(gen, ext, ref, args.num_samples, steps=1, batch_size=500, seed=args.eval_seed,
                               progress=False)["fid"]
            acc, per_class = class_accuracy(gen, ext.model, args.num_samples, args.eval_seed)
            row = {"name": name, "seed": seed, "fid": fid, "accuracy": acc, "per_class": per_class,
                   "train_seconds": seconds, "steps": args.steps, "batch_size": cfg.train.batch_size,
                   "students": cfg.method_config.num_students, "kind": cfg.student.kind}
            results.append(row)
            print(f"{name} seed={seed}: FID {fid:.2f}, accuracy {acc:.3f} (worst class {min(per_class):.2f}), "
                  f"trained in {seconds:.0f} s", flush=True)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nMSD on digits: {args.steps} iterations at batch {results[0]['batch_size']} per run (equal total "
          f"generator updates), one-step samples, {args.num_samples} class-balanced samples, digits classifier "
          f"test accuracy {ext.test_accuracy:.4f}; mean +- std over seeds {args.seeds}\n")
    print("| run | digits FID | per seed | class accuracy | worst class | train s / run |")
    print("|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["name"] for r in results):
        rows = [r for r in results if r["name"] == name]
        fids, accs = [r["fid"] for r in rows], [r["accuracy"] for r in rows]
        print(f"| {name} | {statistics.mean(fids):.2f} +- {_sd(fids):.2f} | {', '.join(f'{v:.2f}' for v in fids)} | "
              f"{statistics.mean(accs):.3f} +- {_sd(accs):.3f} | {min(min(r['per_class']) for r in rows):.2f} | "
              f"{statistics.mean(r['train_seconds'] for r in rows):.0f} |")


if __name__ == "__main__":
    main()
