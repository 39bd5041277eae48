"""A second opinion on digits class accuracy: an SVM trained on scikit-learn's own 8x8 digits, not the project's
digits classifier (the one ``eval fid --features digits`` and the README's accuracy columns use).

    PYTHONPATH=. python benchmarks/svm_accuracy.py runs/digits-tscd --steps 1 2 4
    PYTHONPATH=. python benchmarks/svm_accuracy.py assets/teachers/digits --steps 40

For each model and step count K (a TSCD run gives its K-segment stage student, a teacher samples K Heun steps):
``--sets`` sets of ``--num-samples`` class-balanced samples (labels 0..9 in turn; sample seeds 100, 101, ...),
each 16x16 sample 2x2-average-pooled to 8x8 and mapped from [-1, 1] to the dataset's 0..16 ink scale, then read by
``sklearn.svm.SVC(gamma=0.001)`` fitted on all 1797 images (0.972 in 5-fold cross-validation). Prints the accuracy's
mean over the sets with its standard error. 8 x 500 samples take about a minute per student, several for a
40-step teacher, on one core.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.svm import SVC

from diffdistill.generator import load_generator


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
    args = ap.parse_args()
    torch.set_num_threads(1)
    digits = load_digits()
    svm = SVC(gamma=0.001).fit(digits.data, digits.target)
    print("| model | steps | SVM accuracy (mean +- s.e.) | per set |")
    print("|---|---|---|---|", flush=True)
    for path in args.models:
        for k in args.steps:
            gen = load_generator(path, steps=k)
            labels = gen.labels_for(args.num_samples, range(10)).numpy()  # the labels sample() cycles through
            accs = [float((svm.predict(to_digits_scale(gen.sample(args.num_samples, steps=k, labels=range(10),
                                                                   seed=100 + s))) == labels).mean())
                    for s in range(args.sets)]
            se = float(np.std(accs) / np.sqrt(len(accs)))
            print(f"| {path} | {k} | {np.mean(accs):.4f} +- {se:.4f} | {' '.join(f'{a:.3f}' for a in accs)} |",
                  flush=True)


if __name__ == "__main__":
    main()
