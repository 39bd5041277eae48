"""Train a config for N iterations on an EDM teacher and report throughput, model FLOP utilisation and FID.

For GPU users with an EDM teacher (``diffdistill convert edm``), EDM's reference statistics (``fid-refs/
imagenet-64x64.npz``, ``cifar10-32x32.npz``) and the Inception weights file::

    python benchmarks/edm_fid.py --config configs/imagenet64/dmd2.yaml --iterations 2000 --eval-every 1000 \
        --ref-stats fid-refs/imagenet-64x64.npz --inception-weights weights-inception-2015-12-05-6726825d.pth \
        --num-samples 10000 --set train.batch_size=40

``--iterations`` are timed after a warm-up cycle and a FLOP-counted cycle (``dfake_gen_update_ratio`` iterations
each). Every iteration runs through the training loop's own pieces (:class:`~diffdistill.training.stepper.Stepper`,
accelerate autocast in ``train.mixed_precision``: bf16 in the GPU configs). Reported per window of
``--eval-every`` iterations:

- images / s: ``train.batch_size`` generator samples per iteration over the mean iteration time (CUDA synchronised);
- GFLOP / it: the model FLOPs of one iteration (every forward and backward of every network: generator, teacher,
  fake score, GAN head), counted by ``torch.utils.flop_counter`` over one full cycle of
  ``dfake_gen_update_ratio`` iterations (one generator turn), divided by its length;
- MFU: achieved model FLOP/s over the device's peak (bf16 dense: H100 / H200 989 TFLOP/s, A100 312;
  ``--peak-tflops`` for others; none on CPUs unless given);
- FID: ``--num-samples`` class-balanced one-step samples of the live student against ``--ref-stats``, with the
  FID Inception network of ``--inception-weights`` (skipped, ``-``, when either file is absent).

Without a GPU, ``--tiny`` runs the same on the CPU: the EDM snapshot fixture of the tests (NCSN++ on 8x8 digits)
converted into a teacher, ``configs/digits/dmd2.yaml`` at batch 8. Its numbers say that the script works, not
how fast anything is.
"""

from __future__ import annotations

import argparse
import atexit
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_tflops(mixed_precision: str, given: float | None) -> float | None:
    if given:
        return given
    if not torch.cuda.is_available() or mixed_precision != "bf16":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def sync() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def tiny_overrides(work: Path) -> tuple[str, list[str]]:
    """A tiny EDM teacher (the converter's fixture) and the digits DMD2 config shrunk to it."""
    from diffdistill.convert import convert_edm

    teacher = convert_edm(REPO / "tests/fixtures/edm/snapshot.pkl", work / "teacher")
    return "configs/digits/dmd2.yaml", [f"teacher.path={teacher}", "data.resolution=8", "train.batch_size=8",
                                        "student.levels=[80.0]", "dmd2.dropout=0.0"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/imagenet64/dmd2.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--eval-every", type=int, default=1000, help="FID (and a table row) every N iterations")
    ap.add_argument("--ref-stats", default=None, help="EDM fid-refs .npz (mu, sigma)")
    ap.add_argument("--inception-weights", default=None, help="weights-inception-2015-12-05-6726825d.pth")
    ap.add_argument("--num-samples", type=int, default=10000, help="generated images per FID (papers: 50000)")
    ap.add_argument("--fid-batch", type=int, default=250)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny EDM teacher (see the docstring)")
    args = ap.parse_args()

    from diffdistill.config import load_config
    from diffdistill.generator import Generator
    from diffdistill.training.batches import BatchSource
    from diffdistill.training.build import build_method
    from diffdistill.training.loop import _dataset_for, make_accelerator
    from diffdistill.training.stepper import Stepper

    work = Path(tempfile.mkdtemp(prefix="edm_fid_"))  # the run folder and the tiny teacher, removed at exit
    atexit.register(shutil.rmtree, work, True)
    config, overrides = (tiny_overrides(work) if args.tiny else (args.config, []))
    if args.tiny:
        torch.set_num_threads(1)  # a tiny network on a shared CPU: one thread is faster than contended two
        if args.iterations == 2000:
            args.iterations, args.eval_every, args.num_samples = 10, 5, 64
    cfg = load_config(REPO / config if not Path(config).is_file() else config, overrides=[
        *overrides, f"output_dir={work / 'run'}", *args.overrides])
    ratio = getattr(cfg.method_config, "dfake_gen_update_ratio", 1)
    cfg.train.steps = args.iterations + 2 * ratio  # schedules see the whole run: warm-up, counted and timed cycles
    acc = make_accelerator(cfg.train.mixed_precision)
    method, teacher = build_method(cfg, acc.device)
    dataset = _dataset_for(cfg, method)
    source = BatchSource(dataset, teacher, method.student.net.num_classes, cfg.train.batch_size, acc.process_index,
                         acc.num_processes, cfg.train.seed, acc.device)
    stepper = Stepper(method, acc, cfg.train.grad_accum)
    method.on_train_start(work / "run", 0, acc.is_main_process)
    step = 0

    def run(n: int) -> None:
        nonlocal step
        for _ in range(n):
            logs = stepper.step(source.micro_batches(step, cfg.train.grad_accum), step)
            method.on_step_end(step + 1)
            step += 1
            bad = [k for k, v in logs.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                raise SystemExit(f"non-finite {bad} at iteration {step}")

    from torch.utils.flop_counter import FlopCounterMode

    run(ratio)  # warm-up cycle (allocations, kernels), not timed
    counter = FlopCounterMode(display=False)
    with counter:
        run(ratio)
    flops_per_it = counter.get_total_flops() / ratio
    peak = peak_tflops(cfg.train.mixed_precision, args.peak_tflops)

    extractor = ref = None
    fid_note = ""
    if args.ref_stats and args.inception_weights and Path(args.ref_stats).is_file() \
            and Path(args.inception_weights).is_file():
        from diffdistill.metrics.features import InceptionV3Features
        from diffdistill.metrics.reference import npz_ref_stats

        extractor, ref = InceptionV3Features(args.inception_weights).to(acc.device), npz_ref_stats(args.ref_stats)
    else:
        fid_note = "FID skipped: give --ref-stats (EDM fid-refs .npz) and --inception-weights (existing files)"

    params = sum(p.numel() for p in method.student.net.parameters())
    print(f"{config}: {cfg.method}, teacher {cfg.teacher.path} ({params / 1e6:.1f}M parameters), batch "
          f"{cfg.train.batch_size}, {cfg.train.mixed_precision}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, {acc.num_processes} process(es)")
    print(f"{'iteration':>9} {'s / it':>8} {'images / s':>11} {'GFLOP / it':>11} {'MFU':>7} {'FID':>8} {'FID s':>7}")
    first = step  # after the warm-up and the counted cycle
    while step < first + args.iterations:
        n = min(args.eval_every, first + args.iterations - step)
        t0 = sync()
        run(n)
        per_it = (sync() - t0) / n
        fid, fid_s = "-", "-"
        if extractor is not None:
            from diffdistill.metrics.evaluate import evaluate_fid

            t1 = time.perf_counter()
            net = method.student.net
            net.eval()
            with stepper.ema_weights(), acc.autocast():
                res = evaluate_fid(Generator.from_method(method, teacher, cfg.teacher.guidance_scale), extractor, ref,
                                   args.num_samples, batch_size=args.fid_batch, seed=0, progress=False)
            net.train()
            fid, fid_s = f"{res['fid']:.3f}", f"{time.perf_counter() - t1:.0f}"
        mfu = f"{flops_per_it / per_it / (peak * 1e12):.1%}" if peak else "-"
        print(f"{step:>9} {per_it:>8.3f} {cfg.train.batch_size / per_it:>11.1f} {flops_per_it / 1e9:>11.4g} "
              f"{mfu:>7} {fid:>8} {fid_s:>7}")
    if fid_note:
        print(fid_note)
    if not peak:
        print("MFU: no peak FLOP/s known for this device and precision (--peak-tflops)")


if __name__ == "__main__":
    main()
