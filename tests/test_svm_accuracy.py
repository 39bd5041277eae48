"""benchmarks/svm_accuracy.py: the second-opinion classifier reads the digits data on the scale it was fitted on."""

import importlib.util
from pathlib import Path

import numpy as np

from diffdistill.data.images import TEST_EVERY, DigitsDataset

_spec = importlib.util.spec_from_file_location(
    "svm_accuracy", Path(__file__).resolve().parents[1] / "benchmarks" / "svm_accuracy.py")
svm_accuracy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(svm_accuracy)


def test_pooling_undoes_the_datasets_resize_and_the_svm_reads_the_held_out_fifth():
    """The 16x16 digits the teacher trained on, pooled back by ``to_digits_scale``, are scikit-learn's 8x8
    originals slightly blurred (bilinear up, average down: about one of 16 ink levels per pixel), and an SVM
    fitted on the other four fifths of the originals reads the held-out fifth of them as well as the originals
    (0.989 against 0.986; on the wrong ink scale, 0..1, it reads 0.08)."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    raw = load_digits()
    back = svm_accuracy.to_digits_scale(DigitsDataset(16).images)
    assert back.shape == raw.data.shape
    assert np.abs(back - raw.data).mean() < 1.5
    held = np.arange(len(raw.target)) % TEST_EVERY == 0  # the dataset's own test split
    svm = SVC(gamma=0.001).fit(raw.data[~held], raw.target[~held])
    assert (svm.predict(back[held]) == raw.target[held]).mean() > 0.97
    assert np.array_equal(svm_accuracy.to_digits_scale(DigitsDataset(8).images), raw.data)
