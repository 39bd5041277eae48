"""The digits classifier behind the embedded benchmark's "digits FID" (a domain FID, as LeNet-FID on MNIST).

A small CNN trained by the project on scikit-learn's handwritten digits (8x8, values 0..16, mapped to
``[-1, 1]`` and bilinearly resized to 16 px, one channel; ``diffdistill.data.DigitsDataset``'s train
split, its test split held out), deterministically (fixed seed, CPU). Its
weights are cached as safetensors under :func:`~diffdistill.metrics.features.cache_dir`, keyed by a
hash of the training recipe, with the held-out test accuracy in the file's metadata. FID uses the
64-d penultimate pre-activation features (pre-ReLU, so no dead dimensions make the covariance singular).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .features import FeatureExtractor, cache_dir, file_sha256

DIGITS_RESOLUTION = 16


def load_digits_images(resolution: int = DIGITS_RESOLUTION, split: str = "all") -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as ``([N, 1, R, R] float32 in [-1, 1], labels [N] int64)``.

    Thin wrapper on :class:`diffdistill.data.DigitsDataset` (values ``v / 8 - 1``, bilinear resize);
    ``split`` is ``"all"`` (1,797 images), ``"train"`` or ``"test"`` (every 5th image, 360 images).
    """
    from ..data import DigitsDataset

    data = DigitsDataset(resolution, split)
    return data.images, data.labels


@dataclass(frozen=True)
class DigitsRecipe:
    """Everything that determines the classifier's weights (its hash names the cache file)."""

    widths: tuple[int, int] = (32, 64)  # conv channels of the two 3x3 conv blocks
    hidden: int = 128  # fully connected layer after the convs
    feature_dim: int = 64  # penultimate layer: the FID features
    epochs: int = 20  # passes over the training split
    batch_size: int = 64
    lr: float = 3e-3  # AdamW, cosine decay to 0
    weight_decay: float = 1e-4
    max_shift: int = 1  # random translation augmentation, in pixels at 16 px
    test_split: str = "every-5th"  # DigitsDataset's held-out split: index % 5 == 0 (360 images)
    seed: int = 0  # initialisation, shuffling and augmentation
    version: int = 2  # bump when the code below changes what a recipe trains

    def sha(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


class DigitsCNN(nn.Module):
    """``[N, 1, 16, 16] -> logits [N, 10]``; :meth:`features` gives the ``[N, feature_dim]`` penultimate layer."""

    def __init__(self, widths: tuple[int, int] = (32, 64), hidden: int = 128, feature_dim: int = 64) -> None:
        super().__init__()
        c1, c2 = widths
        self.convs = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16 -> 8
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8 -> 4
            nn.Flatten(), nn.Linear(c2 * 16, hidden), nn.ReLU(), nn.Linear(hidden, feature_dim))
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.convs(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.features(x)))


def _shift(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Translate each image by up to ``max_shift`` px, filling with background (-1)."""
    if max_shift == 0:
        return x
    h, w = x.shape[-2:]
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    offs = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=gen)
    out = torch.empty_like(x)
    for a in range(2 * max_shift + 1):  # one slice per offset, not per image
        for b in range(2 * max_shift + 1):
            sel = (offs[:, 0] == a) & (offs[:, 1] == b)
            out[sel] = pad[sel, :, a:a + h, b:b + w]
    return out


@torch.no_grad()
def accuracy(model: DigitsCNN, x: Tensor, y: Tensor) -> float:
    return float((model(x).argmax(dim=1) == y).float().mean())


def train_digits_classifier(recipe: DigitsRecipe = DigitsRecipe()) -> tuple[DigitsCNN, float]:
    """Train the classifier on CPU, deterministically; returns ``(model, test_accuracy)``.

    Runs on one thread: a fixed reduction order (bit-reproducible weights) and no oversubscription
    when several processes share the CPU.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(recipe)
    finally:
        torch.set_num_threads(threads)


def _train(recipe: DigitsRecipe) -> tuple[DigitsCNN, float]:
    xtr, ytr = load_digits_images(split="train")
    gen = torch.Generator().manual_seed(recipe.seed)
    with torch.random.fork_rng(devices=[]):  # the init draws from the global RNG: isolate it
        torch.manual_seed(recipe.seed)
        model = DigitsCNN(recipe.widths, recipe.hidden, recipe.feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = -(-len(ytr) // recipe.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.epochs * steps_per_epoch)
    model.train()
    for _ in range(recipe.epochs):
        perm = torch.randperm(len(ytr), generator=gen)
        for start in range(0, len(perm), recipe.batch_size):
            b = perm[start:start + recipe.batch_size]
            loss = F.cross_entropy(model(_shift(xtr[b], recipe.max_shift, gen)), ytr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model, accuracy(model, *load_digits_images(split="test"))


def load_or_train_digits_classifier(recipe: DigitsRecipe = DigitsRecipe(), directory: Path | None = None,
                                    verbose: bool = False) -> tuple[DigitsCNN, float, Path]:
    """The cached classifier for ``recipe`` (trained and saved on first use): ``(model, test_acc, file)``."""
    path = Path(directory or cache_dir()) / f"digits-classifier-{recipe.sha()}.safetensors"
    model = DigitsCNN(recipe.widths, recipe.hidden, recipe.feature_dim)
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            model.load_state_dict({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not iterable)
            meta = f.metadata()
        return model.eval(), float(meta["test_accuracy"]), path
    t0 = time.perf_counter()
    model, acc = train_digits_classifier(recipe)
    if verbose:
        print(f"trained digits classifier in {time.perf_counter() - t0:.1f} s, test accuracy {acc:.4f} -> {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: concurrent first runs do not clash
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"recipe": json.dumps(asdict(recipe)), "test_accuracy": repr(acc)})
    tmp.replace(path)
    return model, acc, path


class DigitsFeatures(FeatureExtractor):
    """The "digits FID" features: the cached digits classifier's 64-d penultimate layer.

    Accepts any resolution and channel count: RGB is averaged to grey and images are resized to 16 px
    (bilinear, antialiased when shrinking), the resolution the classifier was trained at.
    """

    name = "digits-cnn"
    resize = f"bilinear-antialias-{DIGITS_RESOLUTION}"

    def __init__(self, recipe: DigitsRecipe = DigitsRecipe(), directory: Path | None = None) -> None:
        super().__init__()
        model, acc, path = load_or_train_digits_classifier(recipe, directory)
        self.model = model.requires_grad_(False)
        self.test_accuracy = acc
        self.dim = recipe.feature_dim
        self.weights_path = str(path)
        self.weights_hash = file_sha256(path)

    def info(self) -> dict:
        return {**super().info(), "weights_file": self.weights_path, "test_accuracy": self.test_accuracy}

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = images.float()
        if x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (DIGITS_RESOLUTION, DIGITS_RESOLUTION):
            x = F.interpolate(x, size=(DIGITS_RESOLUTION, DIGITS_RESOLUTION), mode="bilinear",
                              align_corners=False, antialias=x.shape[-1] > DIGITS_RESOLUTION)
        return self.model.features(x.to(next(self.model.parameters()).device))
