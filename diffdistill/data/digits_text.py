"""Captions for scikit-learn's digits: the data of the embedded text-to-image teacher.

Every class has a fixed set of *training* phrasings ("a handwritten seven", "the digit 7", ...) and a
disjoint set of *held-out* phrasings ("an image showing a seven", "digit seven written by hand", ...)
that no training run ever sees: they measure whether a text-conditional model (and the students
distilled from it) understands the request rather than memorising caption strings
(:func:`diffdistill.metrics.text_digits.prompted_class_accuracy`).

:class:`CaptionedDigitsDataset` is :class:`~diffdistill.data.images.DigitsDataset` plus ``captions``
(one training phrasing per image, drawn once with a fixed seed) and ``class_phrasings`` (every training
phrasing of every class, which teacher training draws from afresh at each step). ``data.name: digits``
builds it, so a text teacher's distillation conditions each real image on its own caption while a
class-conditional teacher keeps using the labels.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .images import DigitsDataset

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {w}: the digit as a word ("seven"), {n}: as a numeral ("7"), {a_w} / {a_n}: with its article ("an eight").
TRAIN_TEMPLATES = (
    "{n}",
    "{w}",
    "the digit {n}",
    "the digit {w}",
    "digit {w}",
    "a handwritten {w}",
    "a handwritten {n}",
    "number {w}",
    "the number {n}",
    "a picture of the number {w}",
    "an image of {a_n}",
    "a drawing of the digit {w}",
    "{w} written by hand",
    "a photo of a handwritten {n}",
    "the numeral {w}",
    "{a_w}",
)
# Never used for training: new words and new arrangements of known ones (evaluation only).
HELDOUT_TEMPLATES = (
    "an image showing {a_w}",
    "digit {w} written by hand",
    "a scan of a handwritten {n}",
    "please draw the number {w}",
    "{w}, handwritten",
    "a small grey picture of the digit {n}",
    "the handwritten numeral {n}",
    "a sketch of {a_w}",
)
CAPTION_SEED = 0  # which training phrasing each image's fixed caption uses


def _article(word: str) -> str:
    return "an" if word in ("eight", "8") else "a"


def phrase(template: str, digit: int) -> str:
    """``template`` filled in for ``digit`` (0..9)."""
    w, n = DIGIT_WORDS[digit], str(digit)
    return template.format(w=w, n=n, a_w=f"{_article(w)} {w}", a_n=f"{_article(n)} {n}")


def class_phrasings(templates: Sequence[str] = TRAIN_TEMPLATES) -> list[list[str]]:
    """``[10][len(templates)]``: every template filled in for each class."""
    return [[phrase(t, d) for t in templates] for d in range(10)]


def caption_words() -> list[str]:
    """The lower-case words of every training and held-out phrasing (the text teacher's tokenizer covers them)."""
    words = set()
    for templates in (TRAIN_TEMPLATES, HELDOUT_TEMPLATES):
        for row in class_phrasings(templates):
            for p in row:
                words.update(p.replace(",", " ").split())
    return sorted(w for w in words if w.isalpha())


class CaptionedDigitsDataset(DigitsDataset):
    """:class:`DigitsDataset` with captions: ``captions[i]`` is one training phrasing of image ``i``'s class
    (chosen once, seed :data:`CAPTION_SEED`); ``class_phrasings[c]`` lists every training phrasing of class
    ``c``. Items are ``(image, label)`` as for the plain dataset."""

    def __init__(self, resolution: int = 16, split: str = "all", channels: int = 1) -> None:
        super().__init__(resolution, split, channels)
        self.class_phrasings = class_phrasings(TRAIN_TEMPLATES)
        self.heldout_phrasings = class_phrasings(HELDOUT_TEMPLATES)  # evaluation only, never trained on
        pick = np.random.default_rng(CAPTION_SEED).integers(len(TRAIN_TEMPLATES), size=len(self.labels))
        self.captions = [self.class_phrasings[int(y)][int(k)] for y, k in zip(self.labels, pick)]
