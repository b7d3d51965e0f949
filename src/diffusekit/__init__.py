"""diffusekit: diffusion models end to end, in PyTorch."""

from .denoiser import PREDICTIONS, Denoiser
from .oracle import GaussianMixture
from .sampling import SAMPLERS, initial_noise, sample, seeded_generators
from .schedules import SCHEDULE_NAMES, SPACINGS, NoiseSchedule, abar_to_sigma, log_snr, sigma_to_abar

__version__ = "0.1.0"

__all__ = [
    "Denoiser",
    "GaussianMixture",
    "NoiseSchedule",
    "PREDICTIONS",
    "SAMPLERS",
    "SCHEDULE_NAMES",
    "SPACINGS",
    "abar_to_sigma",
    "initial_noise",
    "log_snr",
    "sample",
    "seeded_generators",
    "sigma_to_abar",
]
