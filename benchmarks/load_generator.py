"""Load time and peak memory of ``load_generator`` on a DMD2 checkpoint: the student artefact vs the old path.

The old ``load_generator`` rebuilt the whole training method to sample (teacher, fake score copied from it,
GAN head, optimizers, EMA) and restored every network from the checkpoint. The artefact path builds the
student network alone and assigns its weights. Each variant runs in a fresh subprocess; memory is the rise
of the process's peak resident set size (``ru_maxrss``) over its size after the imports.

    PYTHONPATH=. python benchmarks/load_generator.py                       # trains a 20-step digits run first
    PYTHONPATH=. python benchmarks/load_generator.py --run runs/quickstart/dmd2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANT = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
import diffdistill.generator, diffdistill.artefact, diffdistill.training.build, diffdistill.methods.dmd2  # warm
import accelerate, diffusers, peft, safetensors.torch  # noqa: F401  (warm: the delta is the models, not imports)
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel  # noqa: F401
import diffdistill.training.stepper, diffdistill.teachers, diffdistill.config  # noqa: F401
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if sys.argv[2] == "artefact":
    gen = diffdistill.generator.load_generator(sys.argv[1], device="cpu")
    modules = [gen.model]
else:  # the old path: build the training method from the resolved config, then restore every network
    from diffdistill.checkpoint_io import load_network, resolve_checkpoint
    from diffdistill.config import load_config
    from diffdistill.training.build import build_method
    from diffdistill.training.stepper import Stepper
    ckpt = resolve_checkpoint(sys.argv[1])
    method, teacher = build_method(load_config(ckpt / "config.yaml"), "cpu")
    stepper = Stepper(method)
    for name, net in method.nets.items():
        load_network(net, ckpt / f"{name}.safetensors")
    modules = [teacher.denoiser, *method.nets.values()]
    gen = diffdistill.generator.Generator.from_method(method, teacher)
gen.sample(8, seed=0)
seconds = time.perf_counter() - t0
params = sum(p.numel() for m in modules for p in m.parameters())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_mib": (peak - base) / 1024, "parameters": params}))
"""


def measure(run: str, variant: str) -> dict:
    out = subprocess.run([sys.executable, "-c", VARIANT, run, variant], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a DMD2 run or checkpoint folder (default: train a 20-step digits run)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    run = args.run
    if run is None:
        run = str(Path(tempfile.mkdtemp()) / "dmd2")
        subprocess.run([sys.executable, "-m", "diffdistill", "train", "--config", "configs/digits/dmd2.yaml",
                        "--output", run, "--set", "train.steps=20", "--set", "train.sample_every=0"], check=True)
    rows = []
    for variant in ("training method (old)", "student artefact"):
        key = "method" if variant.startswith("training") else "artefact"
        results = [measure(run, key) for _ in range(args.repeats)]
        rows.append((variant, min(r["seconds"] for r in results), max(r["peak_mib"] for r in results),
                     results[0]["parameters"]))
    print(f"load_generator + 8 one-step samples on {run} (best of {args.repeats} for time, worst for memory)")
    print(f"{'path':<24} {'seconds':>8} {'peak MiB':>9} {'parameters built':>17}")
    for name, sec, mib, params in rows:
        print(f"{name:<24} {sec:>8.3f} {mib:>9.1f} {params:>17,}")


if __name__ == "__main__":
    main()
