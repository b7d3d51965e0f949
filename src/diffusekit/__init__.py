"""diffusekit: diffusion models end to end, in PyTorch."""

import os

# OpenMP's wait policy, chosen by how busy the machine is when diffusekit is imported (before
# torch, as the CLI does; an explicit OMP_WAIT_POLICY wins). Measured on this 2-core machine, a
# 2-thread shapes U-Net training step: idle, the default short spin is 1.5-1.7x faster than
# passive waiting (3.55 against 2.3 steps/s); beside another busy process, passive waiting is
# 1.5-2x faster than spinning (445 against 651-891 ms per step; beside one single-threaded busy
# loop, 1.54 against 0.88 steps/s).
def _cpu_jiffies() -> tuple[int, int]:
    """(all CPUs' busy jiffies, this process's) from /proc."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # less idle and iowait
    with open("/proc/self/stat") as f:
        own = f.read().rsplit(")", 1)[1].split()
    return busy, int(own[11]) + int(own[12])  # utime + stime


def _machine_is_busy(window: float = 0.1) -> bool:
    """Whether other processes keep a quarter of the cores or more busy, measured over `window`
    seconds from /proc/stat where there is one (the 1-minute load average lags by a minute or
    more: a job started just after another one ended waited passively beside nothing), else
    judged by the load average."""
    import time

    cores = os.cpu_count() or 1
    try:
        busy0, own0 = _cpu_jiffies()
        start = time.monotonic()
        time.sleep(window)
        busy1, own1 = _cpu_jiffies()
        jiffies = (time.monotonic() - start) * os.sysconf("SC_CLK_TCK")
        return (busy1 - busy0 - (own1 - own0)) >= 0.25 * cores * jiffies
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        return os.getloadavg()[0] >= 0.5 * cores
    except (AttributeError, OSError):  # neither: assume shared
        return True


if "OMP_WAIT_POLICY" not in os.environ and _machine_is_busy():
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def _keep_freed_memory(limit: int = 1 << 30) -> None:
    """Have glibc keep freed blocks below `limit` bytes for reuse. By default it returns every
    freed block over 128 KB-32 MB to the kernel, so each new activation tensor of a training step
    is fresh memory that the kernel faults in and zeroes page by page: ~3,000 page faults per
    digits-sized U-Net step, and the step 5-10% slower (measured: 109-117 against 104-105 ms on two
    threads). The cost is that a process's resident memory stays at its peak, as with PyTorch's
    CUDA caching allocator. glibc's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ variables
    win; other C libraries are left alone."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, TypeError, AttributeError):  # no C library handle (Windows) or no mallopt (macOS)
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, limit)
    mallopt(m_trim_threshold, limit)


_keep_freed_memory()

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
