"""Deterministic batches: the batch of step ``k`` is a pure function of ``(seed, k)``.

The global batch of step ``k`` is ``global_batch`` indices drawn without replacement from a generator
seeded with ``(seed, k)``; process ``r`` of ``W`` takes slice ``r``. So a resumed run sees exactly the
batches the interrupted one would have, each process sees its own shard, and the union over processes
equals the one-process batch. The step's noise comes from a second generator seeded with
``(seed, k)`` that draws for the global batch (:class:`~diffdistill.methods.Batch`), so W processes
reproduce the one-process run up to the order of floating-point reductions.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..denoiser import cond_to
from ..errors import UserError
from ..methods import Batch


def mix_seed(*ints: int) -> int:
    """A 63-bit seed from several integers (splitmix-style), stable across runs and platforms."""
    h = 0x9E3779B97F4A7C15
    for v in ints:
        h ^= (int(v) + 0x9E3779B97F4A7C15 + ((h << 6) & (2**64 - 1)) + (h >> 2)) & (2**64 - 1)
        h = (h * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return h & (2**63 - 1)


class BatchSource:
    """Produces the :class:`Batch` of each step for one process.

    Args:
        dataset: a map-style dataset returning ``(image, label)`` (or ``None`` for data-free methods).
        teacher: the teacher bundle (``encode_images`` / ``encode_prompts``; ``None`` when training a teacher).
        num_classes: class count of the model being trained or distilled (``None``: unconditional).
        global_batch: batch size summed over processes.
        rank, world: this process's index and the number of processes.
        seed: ``train.seed``.
        device: where batches go.
        prompts: for text teachers, the list of prompts conditions are drawn from.
    """

    def __init__(self, dataset: Optional[Any], teacher: Optional[Any], num_classes: Optional[int],
                 global_batch: int, rank: int, world: int, seed: int, device: torch.device,
                 prompts: Optional[list[str]] = None) -> None:
        if global_batch % world != 0:
            raise UserError(f"train.batch_size={global_batch} must be divisible by the {world} processes")
        if dataset is not None and len(dataset) == 0:
            raise UserError("the dataset is empty")
        self.dataset, self.teacher, self.num_classes = dataset, teacher, num_classes
        self.global_batch, self.rank, self.world, self.seed = global_batch, rank, world, seed
        self.local = global_batch // world
        self.device = device
        self.prompts = prompts
        # In-memory datasets (digits, toy) expose tensors; gather from them directly.
        self._images = getattr(dataset, "images", None)
        self._labels = getattr(dataset, "labels", None)

    def indices(self, step: int, n: int) -> torch.Tensor:
        """This process's slice of the step's global draw from ``n`` items."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, step))
        if n >= self.global_batch:
            idx = torch.randperm(n, generator=g)[: self.global_batch]
        else:  # tiny datasets: sample with replacement
            idx = torch.randint(n, (self.global_batch,), generator=g)
        return idx[self.rank * self.local:(self.rank + 1) * self.local]

    def _load(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._images is not None:
            labels = self._labels[idx] if self._labels is not None else torch.full((len(idx),), -1)
            return self._images[idx], labels
        items = [self.dataset[int(i)] for i in idx]
        images = torch.stack([torch.as_tensor(it[0]) for it in items])
        labels = torch.tensor([int(it[1]) for it in items])
        return images, labels

    def __call__(self, step: int) -> Batch:
        gen = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, step, 1))
        images, cond = None, None
        if self.prompts is not None:
            idx = self.indices(step, len(self.prompts))
            cond = self.teacher.encode_prompts([self.prompts[int(i)] for i in idx])
        if self.dataset is not None:
            images, labels = self._load(self.indices(step, len(self.dataset)))
            images = images.to(self.device, torch.float32)
            if self.teacher is not None:
                images = self.teacher.encode_images(images)
            if self.num_classes and cond is None:
                if (labels < 0).any():
                    raise UserError("the model is class-conditional but the dataset has no labels "
                                    "(put images in one sub-folder per class)")
                cond = labels.to(self.device)
        elif self.num_classes and cond is None:
            # data-free methods on class-conditional teachers: uniform random labels (global draw, sliced)
            cpu = torch.Generator().manual_seed(mix_seed(self.seed, step, 2))
            cond = torch.randint(self.num_classes, (self.global_batch,), generator=cpu)
            cond = cond[self.rank * self.local:(self.rank + 1) * self.local].to(self.device)
        return Batch(images=images, cond=cond_to(cond, self.device), generator=gen, size=self.local,
                     rank=self.rank, world=self.world)
