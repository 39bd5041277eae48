"""A second opinion on digits class accuracy: an SVM trained on scikit-learn's own 8x8 digits, not the project's
digits classifier (the one ``eval fid --features digits`` and the README's accuracy columns use), and a
Frechet distance in a PCA space of those digits instead of the project's digits features.

    PYTHONPATH=. python benchmarks/svm_accuracy.py runs/digits-tscd --steps 1 2 4
    PYTHONPATH=. python benchmarks/svm_accuracy.py assets/teachers/digits --steps 40

For each model and step count K (a TSCD run gives its K-segment stage student, a teacher samples K Heun steps):
``--sets`` sets of ``--num-samples`` class-balanced samples (labels 0..9 in turn; sample seeds 100, 101, ...),
each 16x16 sample 2x2-average-pooled to 8x8 and mapped from [-1, 1] to the dataset's 0..16 ink scale, then read by
``sklearn.svm.SVC(gamma=0.001)`` fitted on all 1797 images (0.972 in 5-fold cross-validation). Prints the accuracy's
mean over the sets with its standard error, and the mean Frechet distance between each set and the 1797 digits in
the space of their first ``--pca`` principal components. The reference digits make the same trip as the samples
(resized to the model's resolution as the training data is, then pooled back): the round trip alone blurs them
enough to read about 100 against the raw 8x8 digits, while 500 of the round-tripped digits read about 5. 8 x 500
samples take about a minute per student, several for a 40-step teacher, on one core.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.svm import SVC

from diffdistill.data.images import DigitsDataset
from diffdistill.generator import load_generator
from diffdistill.metrics.fid import frechet_distance


class PCAFrechet:
    """Frechet distance ``|mu - mu_r|^2 + tr(S + S_r - 2 (S S_r)^(1/2))`` between a set of 8x8 digits (0..16
    scale, ``[N, 64]``) and the reference set, both projected on the reference's first ``dims`` components."""

    def __init__(self, reference: np.ndarray, dims: int = 20) -> None:
        self.pca = PCA(dims).fit(reference)
        f = self.pca.transform(reference)
        self.mu, self.sigma = f.mean(0), np.cov(f, rowvar=False)

    def __call__(self, digits: np.ndarray) -> float:
        f = self.pca.transform(digits)
        return float(frechet_distance(f.mean(0), np.cov(f, rowvar=False), self.mu, self.sigma))


def to_digits_scale(images: torch.Tensor) -> np.ndarray:
    """``[N, 1, H, W]`` in [-1, 1] -> ``[N, 64]`` on 0..16 (H = 16 is average-pooled 2x2; H = 8 is kept)."""
    if images.shape[-1] != 8:
        images = torch.nn.functional.adaptive_avg_pool2d(images, 8)
    return ((images[:, 0] + 1) * 8).clamp(0, 16).flatten(1).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="run folders, stage/student artefacts or teacher folders")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--num-samples", type=int, default=500)
    ap.add_argument("--sets", type=int, default=8)
    ap.add_argument("--pca", type=int, default=20, help="principal components of the Frechet distance")
    args = ap.parse_args()
    torch.set_num_threads(1)
    digits = load_digits()
    svm = SVC(gamma=0.001).fit(digits.data, digits.target)
    frechet: dict[int, PCAFrechet] = {}
    print(f"| model | steps | SVM accuracy (mean +- s.e.) | PCA-{args.pca} Frechet distance (mean +- s.e.) | "
          "accuracy per set |")
    print("|---|---|---|---|---|", flush=True)
    for path in args.models:
        for k in args.steps:
            gen = load_generator(path, steps=k)
            labels = gen.labels_for(args.num_samples, range(10)).numpy()  # the labels sample() cycles through
            accs, fds = [], []
            for s in range(args.sets):
                images = gen.sample(args.num_samples, steps=k, labels=range(10), seed=100 + s)
                x = to_digits_scale(images)
                accs.append(float((svm.predict(x) == labels).mean()))
                size = images.shape[-1]
                if size not in frechet:  # the digits on the same round trip as the samples
                    frechet[size] = PCAFrechet(to_digits_scale(DigitsDataset(size).images), args.pca)
                fds.append(frechet[size](x))
            se, fd_se = (float(np.std(v) / np.sqrt(len(v))) for v in (accs, fds))
            print(f"| {path} | {k} | {np.mean(accs):.4f} +- {se:.4f} | {np.mean(fds):.2f} +- {fd_se:.2f} | "
                  f"{' '.join(f'{a:.3f}' for a in accs)} |", flush=True)


if __name__ == "__main__":
    main()
