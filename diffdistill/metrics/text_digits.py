"""Offline text alignment of digits text-to-image models: the class accuracy of prompted samples.

A prompt names a digit ("an image showing a seven"); the project's digit classifier
(:mod:`diffdistill.metrics.digits`, the network behind the digits FID) reads each sample, and the score
is the fraction it reads as the requested digit. Prompts are class-balanced: global sample ``i`` is
prompted with class ``i mod C`` in phrasing ``(i div C) mod P`` (:func:`class_prompts`), so every
(class, phrasing) pair gets the same number of samples. The same samples give the digits FID against all
1,797 digits (:func:`prompted_class_accuracy` with ``with_fid=True``): the FID of a text model is the FID
of what it draws when asked for each digit in turn.

``python benchmarks/digits_text.py`` prints the table for the shipped text teacher and its students.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .evaluate import batch_seed


def class_prompts(phrasings_per_class: Sequence[Sequence[str]]) -> list[str]:
    """``[C][P]`` phrasings to one list: entry ``i`` is class ``i mod C`` in phrasing ``(i div C) mod P``."""
    n, p = len(phrasings_per_class), len(phrasings_per_class[0])
    if any(len(row) != p for row in phrasings_per_class):
        raise ValueError("every class needs the same number of phrasings")
    return [phrasings_per_class[i % n][(i // n) % p] for i in range(n * p)]


class PromptedGenerator:
    """A generator that prompts global sample ``i`` with ``prompts[i mod len(prompts)]``.

    Wraps a :class:`~diffdistill.generator.Generator` (whose ``sample`` repeats prompts by global index)
    for code that samples without prompts, e.g. :func:`~diffdistill.metrics.evaluate_fid`.
    """

    def __init__(self, generator: Any, prompts: Sequence[str]) -> None:
        self.generator = generator
        self.prompts = list(prompts)
        self.num_classes = None
        self.default_steps = generator.default_steps

    def nfe(self, steps: Optional[int] = None) -> int:
        return self.generator.nfe(steps)

    def sample(self, num_samples: int, steps: Optional[int] = None, labels: Any = None, seed: Optional[int] = None,
               batch_size: Optional[int] = None, offset: int = 0, progress: bool = False) -> Tensor:
        return self.generator.sample(num_samples, steps=steps, prompts=self.prompts, seed=seed, batch_size=batch_size,
                                     offset=offset, progress=progress)


@torch.no_grad()
def digit_logits(extractor: Any, images: Tensor) -> tuple[Tensor, Tensor]:
    """``(features [N, 64], logits [N, 10])`` of the digits classifier behind ``extractor``
    (a :class:`~diffdistill.metrics.DigitsFeatures`) for images in [-1, 1] of any size / channel count."""
    feats = extractor(images).float()
    return feats, extractor.model.head(F.relu(feats)).float()


def prompted_class_accuracy(generator: Any, phrasings_per_class: Sequence[Sequence[str]],
                            num_samples: Optional[int] = None, steps: Optional[int] = None, seed: int = 0,
                            batch_size: int = 250, with_fid: bool = False, extractor: Any = None,
                            progress: bool = False) -> dict:
    """Class accuracy of ``generator``'s samples prompted with ``phrasings_per_class`` (``[C][P]``).

    Args:
        generator: has ``sample(n, steps=, prompts=, seed=, batch_size=[, offset=])`` returning ``[n, C, H, W]``
            in [-1, 1]. A generator whose ``sample`` takes ``offset`` (:class:`~diffdistill.generator.Generator`)
            gets the whole prompt list and the batch's offset (each sample seeded by its global index, as
            ``diffdistill sample``); any other gets the batch's own prompts and seed ``batch_seed(seed, b)``.
        phrasings_per_class: ``phrasings_per_class[c]`` are prompts asking for digit ``c``.
        num_samples: default one sample per (class, phrasing) pair ``C * P``; a multiple of it stays balanced.
        steps: sampling steps (``None``: the generator's own).
        with_fid: also the digits FID of the same samples against all 1,797 digits (``fid``).
        extractor: a :class:`~diffdistill.metrics.DigitsFeatures` (built on first use when ``None``).
    Returns:
        ``accuracy``, ``per_class`` (``[C]``), ``per_phrasing`` (``[P]``, over classes), ``num_samples``,
        ``steps``, ``nfe`` (when the generator tells), ``seed``, ``classifier_test_accuracy`` and ``fid`` (or
        ``None``).
    """
    from tqdm.auto import tqdm

    from .digits import DigitsFeatures
    from .fid import FeatureStats, frechet_distance

    prompts = class_prompts(phrasings_per_class)
    n_cls, n_phr = len(phrasings_per_class), len(phrasings_per_class[0])
    num_samples = len(prompts) if num_samples is None else int(num_samples)
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    extractor = extractor if extractor is not None else DigitsFeatures()
    per_sample = "offset" in inspect.signature(generator.sample).parameters
    correct = torch.zeros(num_samples, dtype=torch.bool)
    stats = FeatureStats(extractor.dim) if with_fid else None
    bar = tqdm(total=num_samples, desc="prompted samples", disable=not progress)
    for b in range(math.ceil(num_samples / batch_size)):
        start, stop = b * batch_size, min((b + 1) * batch_size, num_samples)
        if per_sample:
            images = generator.sample(stop - start, steps=steps, prompts=prompts, seed=seed, batch_size=batch_size,
                                      offset=start)
        else:
            images = generator.sample(stop - start, steps=steps, prompts=[prompts[i % len(prompts)] for i in
                                                                          range(start, stop)],
                                      seed=batch_seed(seed, b), batch_size=batch_size)
        feats, logits = digit_logits(extractor, images.float())
        wanted = torch.arange(start, stop) % n_cls
        correct[start:stop] = logits.argmax(dim=1).cpu() == wanted
        if stats is not None:
            stats.update(feats.cpu())
        bar.update(stop - start)
    bar.close()
    index = torch.arange(num_samples)
    cls, phr = index % n_cls, (index // n_cls) % n_phr
    fid = None
    if stats is not None and stats.count >= 2:
        from .reference import digits_ref_stats

        ref = digits_ref_stats(extractor)
        fid = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
    nfe = generator.nfe(steps) if hasattr(generator, "nfe") else None
    def mean(sel: Tensor) -> Optional[float]:
        return float(correct[sel].float().mean()) if sel.any() else None

    return {"accuracy": float(correct.float().mean()), "per_class": [mean(cls == c) for c in range(n_cls)],
            "per_phrasing": [mean(phr == k) for k in range(n_phr)], "num_samples": num_samples,
            "steps": steps if steps is not None else getattr(generator, "default_steps", None), "nfe": nfe,
            "seed": seed, "fid": fid, "classifier_test_accuracy": getattr(extractor, "test_accuracy", None)}
