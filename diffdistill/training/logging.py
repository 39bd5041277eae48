"""Run-folder logging: the resolved config, ``metrics.jsonl``, TensorBoard events and sample grids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..config import Config, save_config


class RunLogger:
    """Writes ``config.yaml`` once, then one JSON line and TensorBoard scalars per logged step."""

    def __init__(self, run_dir: Path, cfg: Config, enabled: bool = True) -> None:
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is a dependency, but logging must never kill a run
            self.writer = None

    def log(self, step: int, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **row}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in row.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()


def save_sample_grid(method, teacher: Optional[Any], path: Path, cfg: Config, n: int = 64, seed: int = 0) -> None:
    """Sample ``n`` images from the method's current generator (fixed seed, labels 0..9 per row)."""
    from ..generator import Generator, save_grid

    gen = Generator.from_method(method, teacher, guidance_scale=cfg.teacher.guidance_scale)
    if gen.image_like:
        images = gen.sample(n, seed=seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, path)
