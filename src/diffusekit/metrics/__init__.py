"""Evaluation: distances between feature sets, digit-quality scores from small shipped classifiers,
and standard FID/KID features from the Inception network whose weights the user points to.

    from diffusekit.metrics import digit_metrics
    digit_metrics(samples, "mnist")   # samples [N, 1, H, W] in [-1, 1]

    from diffusekit.metrics import frechet_distance, inception_features, load_inception
    net = load_inception("pt_inception-2015-12-05-6726825d.pth")   # pytorch-fid's file; never downloaded
    fid = frechet_distance(inception_features(samples, net), inception_features(real, net))
"""

from .classifier import DIGIT_DATASETS, DigitClassifier, load_classifier, make_junk
from .digits import digit_features, digit_metrics
from .inception import FIDInceptionV3, inception_features, load_inception
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
    "FIDInceptionV3",
    "digit_features",
    "digit_metrics",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "inception_features",
    "kernel_inception_distance",
    "load_classifier",
    "load_inception",
    "make_junk",
    "precision_recall",
]
