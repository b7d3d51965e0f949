"""Evaluation: distances between feature sets, and digit-quality scores from small shipped classifiers.

    from diffusekit.metrics import digit_metrics
    digit_metrics(samples, "mnist")   # samples [N, 1, H, W] in [-1, 1]
"""

from .classifier import DIGIT_DATASETS, DigitClassifier, load_classifier, make_junk
from .digits import digit_features, digit_metrics
from .likelihood import BitsPerDim, ODELikelihood, VLB, bits_per_dim, dequantize, ode_log_likelihood, vlb
from .frechet import (
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
    kernel_inception_distance,
    precision_recall,
)

__all__ = [
    "BitsPerDim",
    "ODELikelihood",
    "VLB",
    "bits_per_dim",
    "dequantize",
    "ode_log_likelihood",
    "vlb",
    "DIGIT_DATASETS",
    "DigitClassifier",
    "digit_features",
    "digit_metrics",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "kernel_inception_distance",
    "load_classifier",
    "make_junk",
    "precision_recall",
]
