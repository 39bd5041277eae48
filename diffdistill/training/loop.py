"""The method-agnostic training loop (accelerate): batches, steps, logging, checkpoints, sample grids.

The loop knows a method only through :class:`~diffdistill.methods.Method` (``train_step``, ``on_step_end``,
``generator``, ``save_artifacts``, its networks and extra state); optimizers, LR schedules, EMA and every
backward / clip / step belong to :class:`~diffdistill.training.stepper.Stepper`. One process by default;
``torchrun`` or ``accelerate launch`` start several with no code change.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from ..config import Config, config_to_yaml_dict
from ..errors import UserError
from ..methods import Method
from .batches import BatchSource, check_guidance_has_conditions, micro_batch_size
from .build import build_method
from .checkpoints import latest_checkpoint, list_checkpoints, load_network, load_safetensors, load_torch, \
    read_meta, save_checkpoint
from .guards import check_data_fits, check_resume, no_half_made_run
from .stepper import Stepper


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the run stopped without saving over good checkpoints."""


def make_accelerator(mixed_precision: str = "no"):
    """An ``Accelerator`` for this process (picks up torchrun / accelerate launch environments)."""
    from accelerate import Accelerator

    if mixed_precision not in ("no", "bf16", "fp16"):
        raise UserError(f"train.mixed_precision must be no, bf16 or fp16, got {mixed_precision!r}")
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision=fp16 needs a CUDA GPU (use bf16 or no on a CPU)")
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        # a second run in the same Python process (notebook, tests) with another precision
        AcceleratorState._reset_state()
    # step_scheduler_with_optimizer=False: an LR schedule advances once per step whatever the process count.
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(),
                       step_scheduler_with_optimizer=False)


def checkpoint_meta(cfg: Config, method: Method, stepper: Stepper) -> dict[str, Any]:
    nets = {name: {"class": type(net).__name__,
                   "parameters": sum(p.numel() for p in net.parameters()),
                   "trainable": sum(p.numel() for p in net.parameters() if p.requires_grad)}
            for name, net in method.nets.items()}
    student = method.student
    return {"method": cfg.method, "networks": nets,
            "student": {"kind": cfg.student.kind, "levels": list(getattr(student, "levels", [])),
                        "renoise": getattr(student, "renoise", None),
                        "denoiser": type(student.net).__name__},
            "ema": stepper.ema_meta(), "extra": method.extra_state(), "format": 1}


def artefact_info(cfg: Config, step: int, latent: bool = False) -> dict[str, Any]:
    """The run facts every student artefact of this run records."""
    return {"method": cfg.method, "teacher": cfg.teacher.path, "guidance_scale": cfg.teacher.guidance_scale,
            "step": step, "latent": latent}


def save_run_artefacts(run_dir: Path, due: dict[str, dict[str, Any]], step: int, cfg: Config, method: Method,
                       stepper: Stepper, latent: bool = False) -> None:
    """Write ``method.generator()`` into each run-level artefact folder of ``due`` (``method.artefacts_due``)."""
    from ..artefact import save_artefact_atomic

    with stepper.ema_weights():
        for rel, extra in due.items():
            save_artefact_atomic(method.generator(), run_dir / rel, {**artefact_info(cfg, step, latent), **extra})


def save(run_dir: Path, step: int, cfg: Config, method: Method, stepper: Stepper, latent: bool = False) -> Path:
    """Write checkpoint ``step``: networks, optimizer / schedule / EMA state, and the student artefact
    (with the EMA weights when EMA is on), which is what sampling loads."""
    import yaml

    def write_student(tmp: Path) -> None:
        from ..artefact import save_artefact

        with stepper.ema_weights():
            save_artefact(method.generator(), tmp / "student", artefact_info(cfg, step, latent))

    return save_checkpoint(run_dir, step, method.nets, stepper.state_dict(), checkpoint_meta(cfg, method, stepper),
                           yaml.safe_dump(config_to_yaml_dict(cfg), sort_keys=False), stepper.ema_state(),
                           keep=cfg.train.keep_checkpoints, write_extra=write_student)


def restore(ckpt: Path, method: Method, stepper: Optional[Stepper] = None) -> int:
    """Load a checkpoint into ``method`` (strictly); returns its step.

    With a ``stepper`` (resume) also its EMA, optimizer, LR-schedule and fp16-scaler state and the CPU RNG,
    so the resumed run continues bit for bit. Sampling never needs this: it loads the checkpoint's student
    artefact.
    """
    meta = read_meta(ckpt)
    for name, net in method.nets.items():
        load_network(net, ckpt / f"{name}.safetensors")
    method.load_extra_state(meta.get("extra", {}))
    if stepper is not None:
        if stepper.ema is not None and (ckpt / "student_ema.safetensors").is_file():
            stepper.load_ema_state(load_safetensors(ckpt / "student_ema.safetensors"),
                                   int(meta["ema"]["optimization_step"]))
        stepper.load_state_dict(load_torch(ckpt / "optimizers.pt"))
        torch.set_rng_state(load_torch(ckpt / "rng.pt")["cpu"])
    return int(meta["step"])


def init_from(path: str, method: Method) -> Path:
    """Start every network of ``method`` that the checkpoint at ``path`` holds (a run folder: its latest) from
    its weights, strictly (``train.init_from``); returns the checkpoint. Optimizers, schedules and the step
    start fresh, as the official DMD2 SD1.5 stage 2 (``--ckpt_only_path``) starts from stage 1."""
    from ..paths import resolve_path

    p = Path(resolve_path(path))
    ck = p if (p / "meta.json").is_file() else latest_checkpoint(p) if p.is_dir() else None
    if ck is None:
        raise UserError(f"train.init_from={path} holds no checkpoint (give a run folder or a checkpoint folder "
                        "with meta.json)")
    loaded = []
    for name, net in method.nets.items():
        if (ck / f"{name}.safetensors").is_file():
            load_network(net, ck / f"{name}.safetensors")
            loaded.append(name)
    missing = [n for n in method.nets if n.startswith("student") and n not in loaded]
    if missing or not loaded:  # the generator must come from it; new networks (a stage's GAN head) start fresh
        raise UserError(f"train.init_from={path}: {ck} has no {(missing or list(method.nets))[0]}.safetensors "
                        f"(it holds {', '.join(sorted(f.stem for f in ck.glob('*.safetensors'))) or 'no networks'})")
    print(f"init_from: {', '.join(loaded)} from {ck}", flush=True)
    return ck


def _dataset_for(cfg: Config, method: Method):
    if not method.needs_data or cfg.data.name == "prompts":
        return None
    from ..data import build_dataset

    return build_dataset(cfg.data)


def _prompts_for(cfg: Config, method: Method) -> Optional[list[str]]:
    """The prompts conditions are drawn from: a prompt file, or, for data-free methods (BOOT), the captions of a
    captioned image folder (each caption as often as it occurs)."""
    from ..data import training_prompts

    if cfg.data.name == "prompts" or (cfg.data.name == "folder" and not method.needs_data):
        return training_prompts(cfg.data)
    return None


def train(cfg: Config, resume: bool = False, stop_after: Optional[int] = None) -> Path:
    """Train ``cfg`` into ``cfg.output_dir`` (see :func:`_train`); a run that fails before its first checkpoint
    removes the folder (or the files) it created (:func:`~diffdistill.training.guards.no_half_made_run`)."""
    with no_half_made_run(Path(cfg.output_dir)):
        return _train(cfg, resume, stop_after)


def _train(cfg: Config, resume: bool = False, stop_after: Optional[int] = None) -> Path:
    """Train ``cfg`` into ``cfg.output_dir``; ``resume`` continues from its latest checkpoint.

    ``stop_after`` ends the loop early after that many steps of this call (tests use it to simulate a
    killed run); the step count and every schedule still follow ``train.steps``.
    """
    from .logging import RunLogger, save_sample_grid

    run_dir = Path(cfg.output_dir)
    if not resume and list_checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose another --output")
    if resume:
        check_resume(run_dir, cfg)  # a run to resume, trained with this config (but for the safe keys)
    accelerator = make_accelerator(cfg.train.mixed_precision)
    accum = cfg.train.grad_accum
    micro_batch_size(cfg.train.batch_size, accelerator.num_processes, accum)  # fail before building anything
    method, teacher = build_method(cfg, accelerator.device)
    if cfg.train.init_from and not (resume and latest_checkpoint(run_dir) is not None):
        init_from(cfg.train.init_from, method)  # before the Stepper copies weights into its EMA
    dataset = _dataset_for(cfg, method)
    check_data_fits(cfg, dataset, method.student.net, teacher)  # channels, resolution, classes: before any step
    prompts = _prompts_for(cfg, method)
    check_guidance_has_conditions(cfg, teacher, dataset, prompts)
    num_classes = method.student.net.num_classes
    latents = None
    if cfg.data.cache_latents and dataset is not None:
        from ..data.latents import cached_latents

        with accelerator.main_process_first():  # the main process encodes and writes; the others then read
            latents = cached_latents(dataset, teacher, accelerator.device, write=accelerator.is_main_process)
    source = BatchSource(dataset, teacher, num_classes, cfg.train.batch_size, accelerator.process_index,
                         accelerator.num_processes, cfg.train.seed, accelerator.device, prompts, latents)
    stepper = Stepper(method, accelerator, accum)
    start = 0
    if resume:
        ck = latest_checkpoint(run_dir)
        if ck is not None:
            start = restore(ck, method, stepper)
    main = accelerator.is_main_process
    method.on_train_start(run_dir, start, main)
    logger = RunLogger(run_dir, cfg, enabled=main)
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start + stop_after)
    bar = tqdm(range(start, end), initial=start, total=cfg.train.steps, disable=not main, desc=f"{cfg.method}")
    window = LogWindow()
    t0 = time.perf_counter()
    for step in bar:
        logs = stepper.step(source.micro_batches(step, accum), step)
        due = method.artefacts_due(step + 1)  # e.g. the student of a stage that ends here, before it switches
        if due and main:
            save_run_artefacts(run_dir, due, step + 1, cfg, method, stepper, getattr(teacher, "vae", None) is not None)
        logs.update(method.on_step_end(step + 1))
        bad = {k: v for k, v in logs.items() if isinstance(v, float) and not math.isfinite(v)}
        if bad:
            last = latest_checkpoint(run_dir)
            raise TrainingDiverged(f"non-finite loss at step {step + 1} ({', '.join(f'{k}={v}' for k, v in bad.items())}); "
                                   f"stopped without saving; last good checkpoint: {last or 'none'}")
        window.add(logs)
        done = step + 1
        if done % cfg.train.log_every == 0 or done == end:
            row = window.means(accelerator)
            status = method.status()  # the method's current state (e.g. a stage), as is, not averaged
            row.update(status)
            row["lr"] = stepper.lr
            row["seconds"] = time.perf_counter() - t0
            logger.log(done, row)
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k.startswith("loss") or k in status})
        if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
            accelerator.wait_for_everyone()
            if main:
                save(run_dir, done, cfg, method, stepper, latent=getattr(teacher, "vae", None) is not None)
                with stepper.ema_weights():
                    method.save_artifacts(run_dir)
        if main and cfg.train.sample_every and (done % cfg.train.sample_every == 0 or done == cfg.train.steps):
            with stepper.ema_weights():
                save_sample_grid(method, teacher, run_dir / "samples" / f"step-{done:07d}.png", cfg)
    accelerator.wait_for_everyone()
    logger.close()
    return run_dir


class LogWindow:
    """Numeric logs accumulated between two log rows; each key's mean is over the iterations where it
    appeared, so a value present every ``n``-th iteration (DMD2's generator losses) is never lost."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, logs: dict[str, Any]) -> None:
        for k, v in logs.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
                self.counts[k] = self.counts.get(k, 0) + 1

    def means(self, accelerator=None) -> dict[str, float]:
        """The per-key means (averaged over processes too), then an empty window."""
        keys = sorted(self.sums)
        vals = torch.tensor([self.sums[k] / self.counts[k] for k in keys], dtype=torch.float64)
        if accelerator is not None and accelerator.num_processes > 1:  # every process logs the same keys
            vals = accelerator.reduce(vals.to(accelerator.device), reduction="mean").cpu()
        self.sums, self.counts = {}, {}
        return dict(zip(keys, vals.tolist()))


def final_losses(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
