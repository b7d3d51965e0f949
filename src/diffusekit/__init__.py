"""diffusekit: diffusion models end to end, in PyTorch."""

import os

# With OpenMP's default busy-waiting, multi-threaded PyTorch sharing the cores with any other busy
# process can run 20-50x slower (measured here: 2.2 s instead of 0.1 s per U-Net forward on a
# loaded 2-core machine). Passive waiting costs little when the machine is idle and removes that
# cliff. It only takes effect when diffusekit is imported before torch (as the CLI does); an
# explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .denoiser import PREDICTIONS, Denoiser  # noqa: E402
from .oracle import GaussianMixture
from .sampling import SAMPLERS, initial_noise, sample, seeded_generators
from .schedules import SCHEDULE_NAMES, SPACINGS, NoiseSchedule, abar_to_sigma, log_snr, sigma_to_abar

__version__ = "0.1.0"



def __getattr__(name: str):
    # imported on first use: the Stable Diffusion pipeline pulls in transformers
    if name == "StableDiffusion":
        from .pipelines.stable_diffusion import StableDiffusion

        return StableDiffusion
    raise AttributeError(f"module 'diffusekit' has no attribute {name!r}")


__all__ = [
    "Denoiser",
    "GaussianMixture",
    "NoiseSchedule",
    "PREDICTIONS",
    "SAMPLERS",
    "SCHEDULE_NAMES",
    "SPACINGS",
    "StableDiffusion",
    "abar_to_sigma",
    "initial_noise",
    "log_snr",
    "sample",
    "seeded_generators",
    "sigma_to_abar",
]
