"""One process vs two (torchrun, gloo on the CPU): the same global batch gives the same losses.

    PYTHONPATH=. python benchmarks/multiprocess.py [--steps 40] [--config configs/digits/teacher.yaml]

Prints the logged loss of each run at each logged step and the largest relative difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/digits/teacher.yaml")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    tmp = Path(tempfile.mkdtemp())
    common = ["--config", args.config, "--set", f"train.steps={args.steps}", "--set", f"train.batch_size={args.batch_size}",
              "--set", "train.log_every=10", "--set", f"train.checkpoint_every={args.steps}", "--set", "train.sample_every=0"]
    secs = {"1 process": run([sys.executable, "-m", "diffdistill", "teacher", "train", *common, "--output", str(tmp / "one")], env),
            "2 processes": run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "diffdistill", "teacher", "train",
                                *common, "--output", str(tmp / "two")], env)}
    rows = {n: [json.loads(x) for x in (tmp / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two")}
    print(f"| step | loss, 1 process | loss, 2 processes (torchrun) | relative difference |")
    print("|---|---|---|---|")
    worst = 0.0
    for a, b in zip(rows["one"], rows["two"]):
        rel = abs(a["loss"] - b["loss"]) / abs(a["loss"])
        worst = max(worst, rel)
        print(f"| {a['step']} | {a['loss']:.6f} | {b['loss']:.6f} | {rel:.2e} |")
    print(f"\nlargest relative difference {worst:.2e}; wall seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()))


if __name__ == "__main__":
    main()
