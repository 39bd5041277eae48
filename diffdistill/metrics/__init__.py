"""Evaluation: feature extractors from local weights, float64 statistics, FID / precision-recall / CLIP score.

- distances: :func:`frechet_distance`, :func:`fid_from_features`, :func:`precision_recall`;
- statistics: :class:`FeatureStats` (streaming float64), :func:`save_stats` / :func:`load_stats` (``.npz``
  with ``mu`` and ``sigma``, EDM fid-refs format), :class:`RefStats` and the reference builders;
- features: :class:`FeatureExtractor`, :class:`InceptionV3Features`, :class:`DigitsFeatures`,
  :class:`ModuleFeatures`;
- a generator's scores: :func:`evaluate_fid`, :func:`evaluate_clip` with :class:`ClipScorer`;
  :func:`prompted_class_accuracy` (text alignment of digits text-to-image models).

Heavy optional pieces (torch-fidelity, open_clip, scikit-learn) are imported only when used.
"""

from __future__ import annotations

from .digits import DigitsFeatures, DigitsRecipe, load_digits_images, load_or_train_digits_classifier
from .evaluate import balanced_labels, batch_seed, evaluate_fid
from .features import (
    INCEPTION_WEIGHTS_NAME,
    FeatureExtractor,
    InceptionV3Features,
    ModuleFeatures,
    as_feature_extractor,
    cache_dir,
    find_inception_weights,
)
from .fid import FeatureStats, feature_moments, fid_from_features, frechet_distance, load_stats, save_stats
from .precision_recall import precision_recall
from .reference import RefStats, digits_ref_stats, folder_ref_stats, npz_ref_stats, resolve_ref_stats
from .text_digits import PromptedGenerator, class_prompts, prompted_class_accuracy


def __getattr__(name: str):
    # CLIP pulls in open_clip (slow import): load it on first use
    if name in ("ClipScorer", "evaluate_clip", "read_prompts"):
        from . import clip

        return getattr(clip, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "INCEPTION_WEIGHTS_NAME",
    "ClipScorer",
    "DigitsFeatures",
    "DigitsRecipe",
    "FeatureExtractor",
    "FeatureStats",
    "InceptionV3Features",
    "ModuleFeatures",
    "PromptedGenerator",
    "RefStats",
    "as_feature_extractor",
    "balanced_labels",
    "batch_seed",
    "cache_dir",
    "class_prompts",
    "digits_ref_stats",
    "evaluate_clip",
    "evaluate_fid",
    "feature_moments",
    "fid_from_features",
    "find_inception_weights",
    "folder_ref_stats",
    "frechet_distance",
    "load_digits_images",
    "load_or_train_digits_classifier",
    "load_stats",
    "npz_ref_stats",
    "precision_recall",
    "prompted_class_accuracy",
    "read_prompts",
    "resolve_ref_stats",
    "save_stats",
]
