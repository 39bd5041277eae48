"""Deterministic batches: the batch of step ``k`` is a pure function of ``(seed, k)``.

The global batch of step ``k`` is ``global_batch`` indices drawn without replacement from a generator
seeded with ``(seed, k)``; process ``r`` of ``W`` takes slice ``r``, and with gradient accumulation each of
its ``grad_accum`` micro-batches takes a consecutive part of that slice. So a resumed run sees exactly
the batches the interrupted one would have, and the union over processes and micro-batches equals the
one-process batch. The step's noise comes from a generator seeded with ``(seed, k)`` (a fresh one per
micro-batch) that draws for the global batch and slices (:class:`~diffdistill.methods.Batch`), so W
processes and k micro-batches reproduce the one-process, one-batch run up to the order of floating-point
reductions.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..denoiser import cond_to
from ..errors import UserError
from ..methods import Batch
from ..seeding import mix_seed  # also re-exported: older imports read it from here


def micro_batch_size(global_batch: int, world: int, grad_accum: int) -> int:
    """Samples per micro-batch; a :class:`UserError` unless ``grad_accum`` divides the per-process batch."""
    if global_batch % world != 0:
        raise UserError(f"train.batch_size={global_batch} must be divisible by the {world} processes")
    local = global_batch // world
    if grad_accum < 1 or local % grad_accum != 0:
        raise UserError(f"train.grad_accum={grad_accum} must divide the per-process batch {local} "
                        f"(train.batch_size={global_batch} over {world} process(es))")
    return local // grad_accum


class BatchSource:
    """Produces the :class:`Batch` (or the micro-batches) of each step for one process.

    Args:
        dataset: a map-style dataset returning ``(image, label)`` (or ``None`` for data-free methods).
        teacher: the teacher bundle (``encode_images`` / ``encode_prompts``; ``None`` when training a teacher).
        num_classes: class count of the model being trained or distilled (``None``: unconditional).
        global_batch: batch size summed over processes (and micro-batches).
        rank, world: this process's index and the number of processes.
        seed: ``train.seed``.
        device: where batches go.
        prompts: for text teachers, the list of prompts conditions are drawn from.
        latents: the dataset's images already encoded by the teacher's VAE (``data.cache_latents``), in
            dataset order; used instead of loading and encoding each batch.
    """

    def __init__(self, dataset: Optional[Any], teacher: Optional[Any], num_classes: Optional[int],
                 global_batch: int, rank: int, world: int, seed: int, device: torch.device,
                 prompts: Optional[list[str]] = None, latents: Optional[torch.Tensor] = None) -> None:
        micro_batch_size(global_batch, world, 1)
        if dataset is not None and len(dataset) == 0:
            raise UserError("the dataset is empty")
        self.dataset, self.teacher, self.num_classes = dataset, teacher, num_classes
        self.global_batch, self.rank, self.world, self.seed = global_batch, rank, world, seed
        self.local = global_batch // world
        self.device = device
        self.prompts = prompts
        self.latents = latents
        # In-memory datasets (digits, toy) expose tensors; gather from them directly.
        self._images = getattr(dataset, "images", None)
        self._labels = getattr(dataset, "labels", None)

    def global_indices(self, step: int, n: int) -> torch.Tensor:
        """The step's global draw of ``global_batch`` indices from ``n`` items."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, step))
        if n >= self.global_batch:
            return torch.randperm(n, generator=g)[: self.global_batch]
        return torch.randint(n, (self.global_batch,), generator=g)  # tiny datasets: with replacement

    def indices(self, step: int, n: int) -> torch.Tensor:
        """This process's slice of the step's global draw from ``n`` items."""
        return self.global_indices(step, n)[self.rank * self.local:(self.rank + 1) * self.local]

    def _load(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._images is not None:
            labels = self._labels[idx] if self._labels is not None else torch.full((len(idx),), -1)
            return self._images[idx], labels
        items = [self.dataset[int(i)] for i in idx]
        images = torch.stack([torch.as_tensor(it[0]) for it in items])
        labels = torch.tensor([int(it[1]) for it in items])
        return images, labels

    def __call__(self, step: int) -> Batch:
        """This process's whole batch of step ``step``."""
        return self._batch(step, self.rank * self.local, self.local)

    def micro_batches(self, step: int, grad_accum: int = 1) -> list[Batch]:
        """This process's batch of step ``step`` as ``grad_accum`` consecutive micro-batches.

        Each is loaded and encoded on its own (only one micro-batch of images or latents is built at a
        time: that is what accumulation saves) and gets its own generator seeded as the step's, with
        ``offset`` / ``global_size`` set so that its noise is its slice of the global draw.
        """
        size = micro_batch_size(self.global_batch, self.world, grad_accum)
        start = self.rank * self.local
        return [self._batch(step, start + j * size, size) for j in range(grad_accum)]

    def _batch(self, step: int, offset: int, size: int) -> Batch:
        """The slice ``[offset, offset + size)`` of the step's global batch."""
        gen = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, step, 1))
        part = slice(offset, offset + size)
        images, cond = None, None
        if self.prompts is not None:
            idx = self.global_indices(step, len(self.prompts))[part]
            cond = self.teacher.encode_prompts([self.prompts[int(i)] for i in idx])
        if self.dataset is not None:
            idx = self.global_indices(step, len(self.dataset))[part]
            if self.latents is not None:  # encoded once (data.cache_latents)
                images = self.latents[idx].to(self.device, torch.float32)
                labels = self._labels[idx] if self._labels is not None else torch.full((len(idx),), -1)
            else:
                images, labels = self._load(idx)
                images = images.to(self.device, torch.float32)
                if self.teacher is not None:
                    images = self.teacher.encode_images(images)
            captions = getattr(self.dataset, "captions", None)
            if cond is None and captions is not None and getattr(self.teacher, "text_encoders", None):
                # captioned images: each real image's own caption conditions it (and the generator's sample)
                cond = self.teacher.encode_prompts([captions[int(i)] for i in idx])
            if self.num_classes and cond is None:
                if (labels < 0).any():
                    raise UserError("the model is class-conditional but the dataset has no labels "
                                    "(put images in one sub-folder per class)")
                cond = labels.to(self.device)
        elif self.num_classes and cond is None:
            # data-free methods on class-conditional teachers: uniform random labels (global draw, sliced)
            cpu = torch.Generator().manual_seed(mix_seed(self.seed, step, 2))
            cond = torch.randint(self.num_classes, (self.global_batch,), generator=cpu)[part].to(self.device)
        return Batch(images=images, cond=cond_to(cond, self.device), generator=gen, size=size, offset=offset,
                     global_size=self.global_batch)


def check_guidance_has_conditions(cfg: Any, teacher: Optional[Any], dataset: Optional[Any],
                                  prompts: Optional[list[str]]) -> None:
    """Classifier-free guidance needs a condition to guide towards: refuse a run that asks for guidance
    (``teacher.guidance_scale``, the method's ``guidance_scale`` or ``guidance_range``) when the samples have
    none — a text teacher trained on an image folder without captions and without a prompt file, or an
    unconditional teacher. Without this check the guided terms would silently be unguided (CFG of the empty
    prompt against itself)."""
    mc = getattr(cfg, "method_config", None)
    asked = {"teacher.guidance_scale": cfg.teacher.guidance_scale}
    if mc is not None and hasattr(mc, "guidance_scale"):
        asked[f"{cfg.method}.guidance_scale"] = mc.guidance_scale
    rng = getattr(mc, "guidance_range", None)
    guided = [f"{k}={v}" for k, v in asked.items() if v is not None and float(v) != 1.0]
    if rng is not None and any(float(w) != 1.0 for w in rng):
        guided.append(f"{cfg.method}.guidance_range={list(rng)}")
    if not guided or teacher is None or teacher.denoiser is None:
        return
    den = teacher.denoiser
    if getattr(den, "is_text", False):
        if prompts is not None or getattr(dataset, "captions", None) is not None:
            return
        raise UserError(f"guidance is asked for ({', '.join(guided)}) but the text teacher gets no prompts: the "
                        f"{cfg.data.name} data has no captions; add metadata.jsonl (file_name, text) or a .txt next "
                        "to each image, or use data.name=prompts, or set the guidance scale to 1")
    if not den.num_classes:
        raise UserError(f"guidance is asked for ({', '.join(guided)}) but the teacher is unconditional: "
                        "set the guidance scale to 1")
