"""The method-agnostic training loop (accelerate): batches, steps, logging, checkpoints, sample grids.

The loop knows a method only through :class:`~diffdistill.methods.Method`: ``prepare``, ``train_step``,
``on_step_end``, ``generator``, its networks / optimizers / schedulers / EMA and its extra state.
One process by default; ``torchrun`` or ``accelerate launch`` start several with no code change.
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
from .batches import BatchSource
from .build import build_method
from .checkpoints import latest_checkpoint, list_checkpoints, load_network, load_safetensors, load_torch, \
    read_meta, save_checkpoint


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


def optim_state(method: Method, accelerator) -> dict[str, Any]:
    state = {"optimizers": {k: o.state_dict() for k, o in method.optimizers.items()},
             "schedulers": {k: s.state_dict() for k, s in method.schedulers.items()}}
    if getattr(accelerator, "scaler", None) is not None:
        state["scaler"] = accelerator.scaler.state_dict()
    return state


def checkpoint_meta(cfg: Config, method: Method) -> dict[str, Any]:
    nets = {name: {"class": type(net).__name__,
                   "parameters": sum(p.numel() for p in net.parameters()),
                   "trainable": sum(p.numel() for p in net.parameters() if p.requires_grad)}
            for name, net in method.nets.items()}
    student = method.student
    return {"method": cfg.method, "networks": nets,
            "student": {"kind": cfg.student.kind, "levels": list(getattr(student, "levels", [])),
                        "renoise": getattr(student, "renoise", None),
                        "denoiser": type(student.net).__name__},
            "ema": None if method.ema is None else {"optimization_step": method.ema.optimization_step,
                                                    "decay": method.ema.decay},
            "extra": method.extra_state(), "format": 1}


def save(run_dir: Path, step: int, cfg: Config, method: Method, accelerator) -> Path:
    import yaml

    return save_checkpoint(run_dir, step, method.nets, optim_state(method, accelerator), checkpoint_meta(cfg, method),
                           yaml.safe_dump(config_to_yaml_dict(cfg), sort_keys=False), method.ema_state(),
                           keep=cfg.train.keep_checkpoints)


def restore(ckpt: Path, method: Method, accelerator=None, optimizers: bool = True) -> int:
    """Load a checkpoint into ``method`` (strictly); returns its step."""
    meta = read_meta(ckpt)
    for name, net in method.nets.items():
        load_network(net, ckpt / f"{name}.safetensors")
    if method.ema is not None and (ckpt / "student_ema.safetensors").is_file():
        method.load_ema_state(load_safetensors(ckpt / "student_ema.safetensors"))
        method.ema.optimization_step = int(meta["ema"]["optimization_step"])
    method.load_extra_state(meta.get("extra", {}))
    if optimizers:
        state = load_torch(ckpt / "optimizers.pt")
        for k, o in method.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in method.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        if "scaler" in state and getattr(accelerator, "scaler", None) is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(load_torch(ckpt / "rng.pt")["cpu"])
    return int(meta["step"])


def _dataset_for(cfg: Config, method: Method):
    if not method.needs_data or cfg.data.name == "prompts":
        return None
    from ..data import build_dataset

    return build_dataset(cfg.data)


def _prompts_for(cfg: Config) -> Optional[list[str]]:
    if cfg.data.name != "prompts":
        return None
    from ..data import PromptDataset

    return list(PromptDataset(cfg.data.path))


def train(cfg: Config, resume: bool = False, stop_after: Optional[int] = None) -> Path:
    """Train ``cfg`` into ``cfg.output_dir``; ``resume`` continues from its latest checkpoint.

    ``stop_after`` ends the loop early after that many steps of this call (tests use it to simulate a
    killed run); the step count and every schedule still follow ``train.steps``.
    """
    from .logging import RunLogger, save_sample_grid

    run_dir = Path(cfg.output_dir)
    if not resume and list_checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose another --output")
    accelerator = make_accelerator(cfg.train.mixed_precision)
    method, teacher = build_method(cfg, accelerator.device)
    dataset = _dataset_for(cfg, method)
    num_classes = method.student.net.num_classes
    source = BatchSource(dataset, teacher, num_classes, cfg.train.batch_size, accelerator.process_index,
                         accelerator.num_processes, cfg.train.seed, accelerator.device, _prompts_for(cfg))
    method.prepare(accelerator)
    start = 0
    if resume:
        ck = latest_checkpoint(run_dir)
        if ck is not None:
            start = restore(ck, method, accelerator)
    main = accelerator.is_main_process
    logger = RunLogger(run_dir, cfg, enabled=main)
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start + stop_after)
    bar = tqdm(range(start, end), initial=start, total=cfg.train.steps, disable=not main, desc=f"{cfg.method}")
    t0 = time.perf_counter()
    for step in bar:
        batch = source(step)
        with accelerator.autocast():
            losses = method.train_step(batch, step)
        losses.update(method.on_step_end(step + 1))
        bad = {k: v for k, v in losses.items() if isinstance(v, float) and not math.isfinite(v)}
        if bad:
            last = latest_checkpoint(run_dir)
            raise TrainingDiverged(f"non-finite loss at step {step + 1} ({', '.join(f'{k}={v}' for k, v in bad.items())}); "
                                   f"stopped without saving; last good checkpoint: {last or 'none'}")
        done = step + 1
        if done % cfg.train.log_every == 0 or done == end:
            keys = sorted(k for k, v in losses.items() if isinstance(v, (int, float)))
            vals = torch.tensor([float(losses[k]) for k in keys], device=accelerator.device)
            vals = accelerator.reduce(vals, reduction="mean") if accelerator.num_processes > 1 else vals
            row = dict(zip(keys, vals.tolist()))
            row["lr"] = next(iter(method.optimizers.values())).param_groups[0]["lr"] if method.optimizers else 0.0
            row["seconds"] = time.perf_counter() - t0
            logger.log(done, row)
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(row.items())[:3]})
        if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
            accelerator.wait_for_everyone()
            if main:
                save(run_dir, done, cfg, method, accelerator)
                method.save_artifacts(run_dir)
        if main and cfg.train.sample_every and (done % cfg.train.sample_every == 0 or done == cfg.train.steps):
            save_sample_grid(method, teacher, run_dir / "samples" / f"step-{done:07d}.png", cfg)
    accelerator.wait_for_everyone()
    logger.close()
    return run_dir


def final_losses(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
