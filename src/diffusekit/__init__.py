"""diffusekit: diffusion models end to end, in PyTorch."""

import os

# OpenMP's wait policy, chosen by how busy the machine is when diffusekit is imported (before
# torch, as the CLI does; an explicit OMP_WAIT_POLICY wins). Measured on this 2-core machine, a
# 2-thread shapes U-Net training step: idle, the default short spin is 1.5-1.7x faster than
# passive waiting (3.55 against 2.3 steps/s); beside another busy process, passive waiting is
# 1.5-2x faster than spinning (445 against 651-891 ms per step). The load average stands in for
# "will share the cores".
def _machine_is_busy() -> bool:
    try:
        return os.getloadavg()[0] >= 0.5 * (os.cpu_count() or 1)
    except (AttributeError, OSError):  # no load average on this platform: assume shared
        return True


if "OMP_WAIT_POLICY" not in os.environ and _machine_is_busy():
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

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
