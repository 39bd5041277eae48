"""The README's digits table: every method's shipped digits config, trained for several seeds (or runs already
trained), scored at 1 / 2 / 4 steps, plus the FID-vs-NFE plot, from one command.

    PYTHONPATH=. python benchmarks/digits_table.py --runs-dir runs/table                 # train what is missing
    PYTHONPATH=. python benchmarks/digits_table.py --runs-dir runs/table --no-train      # score existing runs only
    PYTHONPATH=. python benchmarks/digits_table.py --runs-dir runs/table --configs dmd2 dmd2_4step --seeds 0

Runs live at ``RUNS_DIR/<config>-seed<S>`` (``configs/digits/<config>.yaml`` with ``train.seed=S``); a run
whose latest checkpoint is short of the config's ``train.steps`` is resumed, a missing one trained (unless
``--no-train``: then it is left out). Training everything (9 configs x 3 seeds) takes hours on 2 CPU cores.
``--run NAME=PATH`` adds any other run folder as its own row (one seed).

Per row, at each of ``--steps`` the student supports (a step count it cannot do is "-"; a run that kept one
student per stage, TSCD, is scored at K with its K-segment stage student, as ``--steps K`` picks): digits FID on
``--num-samples`` class-balanced samples (the digits classifier's 64-d features against all 1,797 digits,
the quickstart's metric), class accuracy of the same samples (the classifier's argmax equals the requested
label), mean +- std over seeds; seconds per image (generation only, 1 thread) at the student's own steps; and
training wall seconds (the loop's clock at its last log row; it depends on the machine's load). The teacher
rows use the Heun solver (NFE = 2 steps - 1). Writes ``--out`` (markdown), ``--plot`` (PNG, FID vs NFE,
one line per config, the teacher's curve for reference) and ``--json`` (every number).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import torch

from diffdistill.artefact import stage_artefacts
from diffdistill.errors import UserError
from diffdistill.generator import load_generator
from diffdistill.metrics import DigitsFeatures, digits_ref_stats, evaluate_fid
from diffdistill.paths import REPO_ROOT
from diffdistill.training.build import DEFAULT_TEACHER, resolve_path

CONFIGS = ["dmd2", "dmd2_long", "dmd2_4step", "disback", "msd", "msd_small", "boot", "cd", "ict", "tscd"]
TEACHER_STEPS = [1, 3, 5, 10, 20, 40]  # Heun: NFE 1, 5, 9, 19, 39, 79


class _Recording:
    """A generator whose samples ``evaluate_fid`` draws are also read by the digits classifier (accuracy of the
    very images the FID scores; labels are ``i mod num_classes`` over global indices, as evaluate_fid draws)."""

    def __init__(self, gen: Any, classifier: torch.nn.Module, features: DigitsFeatures) -> None:
        self.gen, self.classifier, self.features = gen, classifier, features
        self.num_classes, self.default_steps = gen.num_classes, gen.default_steps
        self.correct = self.count = 0

    def nfe(self, steps: Optional[int] = None) -> int:
        return self.gen.nfe(steps)

    def sample(self, num_samples, steps=None, labels=None, prompts=None, seed=None, batch_size=None, offset=0):
        x = self.gen.sample(num_samples, steps=steps, labels=labels, seed=seed, batch_size=batch_size, offset=offset)
        if self.num_classes:
            want = torch.arange(offset, offset + num_samples) % self.num_classes if labels is None else \
                torch.as_tensor(list(labels))
            with torch.no_grad():  # DigitsCNN.forward after the extractor's grey / resize handling
                logits = self.classifier.head(torch.relu(self.features(x.float())))
            self.correct += int((logits.argmax(1) == want).sum())
            self.count += num_samples
        return x


def score(gen: Any, ext: DigitsFeatures, ref: Any, num_samples: int, steps: int, seed: int = 1) -> dict:
    """Digits FID, class accuracy, NFE and seconds per image of ``gen`` at ``steps`` (UserError if unsupported)."""
    rec = _Recording(gen, ext.model, ext)
    r = evaluate_fid(rec, ext, ref, num_samples, steps=steps, batch_size=500, seed=seed, progress=False)
    acc = rec.correct / rec.count if rec.count else float("nan")
    return {"fid": r["fid"], "accuracy": acc, "nfe": r["nfe"], "seconds_per_image": r["seconds_per_image"],
            "precision": r["precision"], "recall": r["recall"]}


def train_seconds(run: Path) -> Optional[float]:
    from diffdistill.training.loop import final_losses

    rows = [r for r in final_losses(run) if "seconds" in r]
    return float(rows[-1]["seconds"]) if rows else None


def ensure_run(config: str, seed: int, runs_dir: Path, train: bool, extra: list[str]) -> Optional[Path]:
    """The run folder of ``config`` at ``seed``: trained or resumed when ``train``; None if absent."""
    from diffdistill.config import load_config
    from diffdistill.training.checkpoints import latest_checkpoint, read_meta
    from diffdistill.training.loop import train as train_loop

    run = runs_dir / f"{config}-seed{seed}"
    cfg = load_config(REPO_ROOT / "configs" / "digits" / f"{config}.yaml",
                      [f"train.seed={seed}", f"output_dir={run}", *extra])
    last = latest_checkpoint(run)
    done = last is not None and read_meta(last)["step"] >= cfg.train.steps
    if not done and train:
        print(f"training {config} seed {seed} ({cfg.train.steps} steps) -> {run}", flush=True)
        train_loop(cfg, resume=last is not None)
        last = latest_checkpoint(run)
    return run if last is not None else None


def _mean_sd(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(rows: list[dict], steps: list[int], num_samples: int, teacher: dict) -> str:
    """The markdown table: one line per config (mean ± std over its seeds), the teacher first."""
    head = (["model", "seeds"] + [f"FID {k} step{'s' if k > 1 else ''}" for k in steps]
            + ["class acc. (own steps)", "s / image", "train s"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    t = teacher
    out.append("| teacher (Heun) | - | " + " | ".join(f"{t[k]['fid']:.2f}" if k in t else "-" for k in steps)
               + f" | {t[40]['accuracy']:.3f} (40 steps: FID {t[40]['fid']:.2f}) | {t[40]['seconds_per_image']:.5f} | - |")
    for name in dict.fromkeys(r["name"] for r in rows):
        runs = [r for r in rows if r["name"] == name]
        own = runs[0]["own_steps"]
        cells = [name, ",".join(str(r["seed"]) for r in runs)]
        cells += [_mean_sd([r["scores"][k]["fid"] for r in runs if k in r["scores"]]) for k in steps]
        cells.append(_mean_sd([r["scores"][own]["accuracy"] for r in runs if own in r["scores"]], 3) + f" ({own})")
        spi = [r["scores"][own]["seconds_per_image"] for r in runs if own in r["scores"]]
        cells.append(f"{statistics.mean(spi):.5f}" if spi else "-")
        ts = [r["train_seconds"] for r in runs if r["train_seconds"]]
        cells.append(f"{statistics.mean(ts):.0f}" if ts else "-")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + f"\n\ndigits FID on {num_samples} class-balanced samples; mean ± std over seeds."


def plot(rows: list[dict], teacher: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    tk = sorted(teacher)
    ax.plot([teacher[k]["nfe"] for k in tk], [teacher[k]["fid"] for k in tk], "k--o", label="teacher (Heun)")
    for name in dict.fromkeys(r["name"] for r in rows):
        runs = [r for r in rows if r["name"] == name]
        ks = sorted({k for r in runs for k in r["scores"]})
        nfe = [runs[0]["scores"][k]["nfe"] if k in runs[0]["scores"] else k for k in ks]
        fids = [statistics.mean(r["scores"][k]["fid"] for r in runs if k in r["scores"]) for k in ks]
        ax.plot(nfe, fids, "-o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel("digits FID")
    ax.set_title("students of the shipped digits teacher")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-dir", default="runs/digits-table", help="where runs are (and are trained to)")
    ap.add_argument("--configs", nargs="*", default=CONFIGS, help="configs/digits/<name>.yaml to tabulate")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-train", action="store_true", help="score existing runs only; never train")
    ap.add_argument("--set", action="append", default=[], help="an override for every training run")
    ap.add_argument("--run", action="append", default=[], metavar="NAME=PATH", help="an extra run folder as a row")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--teacher-steps", type=int, nargs="+", default=TEACHER_STEPS)
    ap.add_argument("--num-samples", type=int, default=2000)
    ap.add_argument("--eval-seed", type=int, default=1)
    ap.add_argument("--out", default="runs/digits-table/table.md")
    ap.add_argument("--plot", default="runs/digits-table/fid_vs_nfe.png")
    ap.add_argument("--json", default="runs/digits-table/results.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ext = DigitsFeatures()
    ref = digits_ref_stats(ext)
    teacher_gen = load_generator(resolve_path(DEFAULT_TEACHER), device="cpu")
    # the teacher's scores are cached beside the runs (they take longest: 79 NFE per sample at 40 steps)
    cache = Path(args.runs_dir) / f"teacher-n{args.num_samples}-seed{args.eval_seed}.json"
    teacher = {int(k): v for k, v in json.loads(cache.read_text()).items()} if cache.is_file() else {}
    for k in sorted(set(args.teacher_steps) | {40}):
        if k not in teacher:
            teacher[k] = score(teacher_gen, ext, ref, args.num_samples, k, args.eval_seed)
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(teacher, indent=2))
        print(f"teacher heun {k} steps: FID {teacher[k]['fid']:.3f}, accuracy {teacher[k]['accuracy']:.3f}", flush=True)
    teacher = {k: v for k, v in teacher.items() if k in set(args.teacher_steps) | {40}}
    jobs = [(c, s, None) for c in args.configs for s in args.seeds]
    jobs += [(spec.split("=", 1)[0], 0, Path(spec.split("=", 1)[1])) for spec in args.run]
    rows = []
    for name, seed, path in jobs:
        run = path if path is not None else ensure_run(name, seed, Path(args.runs_dir), not args.no_train, args.set)
        if run is None:
            print(f"skip {name} seed {seed}: no run in {args.runs_dir} (--no-train)", flush=True)
            continue
        gen = load_generator(run, device="cpu")
        scores = {}
        for k in args.steps:
            try:  # a run that kept one student per stage (TSCD) is scored at K with its K-segment student
                stage = stage_artefacts(run).get(k)
                scores[k] = score(load_generator(stage, device="cpu") if stage else gen, ext, ref,
                                  args.num_samples, k, args.eval_seed)
            except UserError as e:
                print(f"  {name} seed {seed}: no {k}-step sampling ({e})", flush=True)
        own = gen.default_steps
        if own not in scores:
            scores[own] = score(gen, ext, ref, args.num_samples, own, args.eval_seed)
        rows.append({"name": name, "seed": seed, "run": str(run), "own_steps": own, "scores": scores,
                     "train_seconds": train_seconds(run)})
        print(f"{name} seed {seed}: " + ", ".join(f"{k} steps FID {v['fid']:.3f} acc {v['accuracy']:.3f}"
                                               for k, v in sorted(scores.items())), flush=True)
    md = table(rows, args.steps, args.num_samples, teacher)
    print("\n" + md)
    for dest, text in ((args.out, md), (args.json, json.dumps({"teacher": teacher, "rows": rows,
                                                                "num_samples": args.num_samples}, indent=2))):
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_text(text + "\n")
    plot(rows, teacher, Path(args.plot))
    print(f"wrote {args.out}, {args.plot}, {args.json} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
