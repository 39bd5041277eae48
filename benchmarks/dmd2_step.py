"""Time one DMD2 training iteration and split it into network passes.

Two settings: the exact Gaussian-mixture teacher with MLP student / fake score (always), and the shipped
digits teacher (when ``assets/teachers/digits`` exists, or ``--teacher PATH``). The iterations run through
:class:`~diffdistill.training.stepper.Stepper`, as in the training loop. Manual timers: forward hooks on
each network (student, teacher, fake score, GAN head), optimizer step hooks, a timer around the Stepper's
backward and one around each network's update (clipping + optimizer step + zeroing). Everything not inside
a timer is framework overhead: noise draws, loss arithmetic, hooks, concatenation, Python. Averages are
over whole cycles of ``dfake_gen_update_ratio`` iterations (one generator turn, the rest critic-only).

    python benchmarks/dmd2_step.py [--cycles 3] [--teacher assets/teachers/digits] [--batch 32]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import defaultdict
from pathlib import Path

import torch

from diffdistill.methods.base import Batch, OptimConfig
from diffdistill.methods.dmd2 import DMD2, DMD2Config
from diffdistill.students import Student, build_student_net
from diffdistill.toy import MixtureDenoiser, default_mixture, mlp_denoiser
from diffdistill.training.stepper import Stepper

REPO = Path(__file__).resolve().parents[1]


class Timers:
    """Wall-clock seconds per label; CUDA is synchronised at every boundary so GPU work is counted."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self._start: dict[str, list[float]] = defaultdict(list)

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def begin(self, label: str) -> None:
        self._start[label].append(self._now())

    def end(self, label: str) -> None:
        self.total[label] += self._now() - self._start[label].pop()

    def watch_module(self, module: torch.nn.Module, label: str) -> None:
        """Time ``module``'s forward, including passes that stop early by exception (GAN features)."""
        inner = module.forward

        def timed(*args, **kwargs):
            self.begin(label)
            try:
                return inner(*args, **kwargs)
            finally:
                self.end(label)

        module.forward = timed


def instrument(stepper: Stepper, timers: Timers) -> None:
    """Attach timers to every network pass, the backward and every update (outermost call counted once)."""
    m = stepper.method
    timers.watch_module(m.student.net, "generator forward")
    timers.watch_module(m.teacher, "teacher forward")
    timers.watch_module(m.nets["fake_score"], "fake-score forward")
    if "gan_head" in m.nets:
        timers.watch_module(m.nets["gan_head"], "GAN head forward")
    for opt in stepper.optimizers.values():
        opt.register_step_pre_hook(lambda *_: timers.begin("optimizer step"))
        opt.register_step_post_hook(lambda *_: timers.end("optimizer step"))
    for name, label in (("_backward", "backward"), ("_update", "update")):
        inner = getattr(stepper, name)

        def timed(*args, _inner=inner, _label=label, **kwargs):
            timers.begin(_label)
            try:
                return _inner(*args, **kwargs)
            finally:
                timers.end(_label)

        setattr(stepper, name, timed)


def run(m: DMD2, make_batch, cycles: int) -> tuple[dict[str, float], float, int]:
    """Average seconds per iteration of each part, total seconds per iteration, iterations timed."""
    ratio = m.config.dfake_gen_update_ratio
    stepper = Stepper(m)
    for step in range(ratio):  # warm-up cycle (allocations, lazy inits)
        stepper.step(make_batch(step), step)
    timers = Timers()
    instrument(stepper, timers)
    n = cycles * ratio
    start = timers._now()
    for step in range(ratio, ratio + n):
        stepper.step(make_batch(step), step)
    total = (timers._now() - start) / n
    parts = {k: v / n for k, v in timers.total.items()}
    # "update" holds clip + optimizer step + zero_grad: report the clipping (and zeroing) on its own
    parts["clip + zero_grad"] = parts.pop("update", 0.0) - parts.get("optimizer step", 0.0)
    return parts, total, n


def report(title: str, parts: dict[str, float], total: float, n: int) -> None:
    order = ["generator forward", "teacher forward", "fake-score forward", "GAN head forward",
             "backward", "clip + zero_grad", "optimizer step"]
    print(f"\n{title}  ({n} iterations averaged)")
    print(f"{'part':<22}{'ms / iter':>12}{'share':>9}")
    accounted = 0.0
    for k in order:
        if k in parts:
            accounted += parts[k]
            print(f"{k:<22}{1e3 * parts[k]:>12.2f}{parts[k] / total:>9.1%}")
    overhead = total - accounted
    print(f"{'framework overhead':<22}{1e3 * overhead:>12.2f}{overhead / total:>9.1%}")
    print(f"{'total':<22}{1e3 * total:>12.2f}{1:>9.0%}")


def toy(cycles: int, batch: int) -> None:
    mix = default_mixture()
    teacher = MixtureDenoiser(mix)
    torch.manual_seed(0)
    net = mlp_denoiser(2, sigma_data=teacher.sigma_data, hidden=128)
    m = DMD2(teacher, Student(copy.deepcopy(net), [teacher.sigma_max]), DMD2Config(), OptimConfig(lr=1e-3),
             fake_score=net)

    def make_batch(step: int) -> Batch:
        g = torch.Generator().manual_seed(step)
        return Batch(mix.sample(batch, g), None, g, batch)

    report(f"toy mixture teacher, MLP 128 student + fake score, batch {batch}", *run(m, make_batch, cycles))


def digits(path: str, cycles: int, batch: int) -> None:
    from diffdistill.data import DigitsDataset
    from diffdistill.teachers import load_teacher

    teacher = load_teacher(path)
    den = teacher.denoiser
    torch.manual_seed(0)
    student = Student(build_student_net(den, "copy"), [den.sigma_max])
    m = DMD2(den, student, DMD2Config(), OptimConfig(lr=1e-5))
    h = den.sample_shape[-1]
    data = DigitsDataset(resolution=h, channels=den.sample_shape[0])
    images, labels = data.images, data.labels

    def make_batch(step: int) -> Batch:
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(len(images), (batch,), generator=torch.Generator().manual_seed(step))
        return Batch(images[idx], labels[idx] if den.num_classes else None, g, batch)

    params = sum(p.numel() for p in den.parameters())
    report(f"digits teacher {path} ({params / 1e6:.2f}M params, {tuple(den.sample_shape)}), batch {batch}",
           *run(m, make_batch, cycles))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=3, help="generator cycles (of 5 iterations) to time")
    parser.add_argument("--teacher", default=str(REPO / "assets/teachers/digits"))
    parser.add_argument("--batch", type=int, default=32, help="digits batch size (the toy uses 256)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}")
    toy(args.cycles, 256)
    if Path(args.teacher).exists():
        digits(args.teacher, args.cycles, args.batch)
    else:
        print(f"\n(no digits teacher at {args.teacher}: skipped)")


if __name__ == "__main__":
    main()
