"""Samplers under one contract: `fn(denoiser, x, sigmas, *, generator, callback, progress, **options)`.

`x` enters as noise already scaled for `sigmas[0]`; `sigmas` is descending and ends in 0. Samplers
never know how the network is parameterised; stochastic ones draw only from `generator`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ancestral, classic, dpm_solver, fitted, ode, unipc  # noqa: F401  (each module registers its samplers)
from .common import initial_noise, randn_like, seeded_generators, start_scale
from .fitted import FittedCoefficients
from .registry import SAMPLERS, SamplerInfo, get_sampler, register


class _Reached(Exception):
    """Raised from a sampler's callback to stop it once it has reached the requested final level."""

    def __init__(self, x: Tensor):
        super().__init__()
        self.x = x


def sample(denoiser, x: Tensor, sigmas: Tensor, method: str = "ddim", *, generator=None, callback=None,
           progress: bool = False, **options) -> Tensor:
    """Run the sampler `method` (any name in `SAMPLERS`) from x at sigmas[0] down the sequence.
    Conditioning for the denoiser goes in `cond={...}`; other options are the sampler's own.

    `sigmas` normally ends in 0 and the result is the clean sample. It may instead end at a level
    above 0: the run then stops there and returns the state, still noisy at that level (one
    interval of inpainting; diffusers' DDIM with `set_alpha_to_one=False`). The sampler runs on the
    sequence with a 0 appended and is stopped from its callback on reaching the last level, so the
    step to 0 is never evaluated and every sampler takes exactly the steps it would take inside a
    longer run."""
    info = get_sampler(method)
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or len(sigmas) < 2 or not sigmas[-1] > 0:
        return info.fn(denoiser, x, sigmas, generator=generator, callback=callback, progress=progress, **options)
    end = float(sigmas[-1])

    def stop(step: dict) -> None:
        if callback is not None:
            callback(step)
        if step["sigma_next"] <= end * (1 + 1e-9):  # dpm_adaptive reports sub-steps: stop at the last
            raise _Reached(step["x"])

    try:
        info.fn(denoiser, x, torch.cat([sigmas, sigmas.new_zeros(1)]), generator=generator, callback=stop,
                progress=progress, **options)
    except _Reached as reached:
        return reached.x
    raise RuntimeError(f"sampler {method!r} did not report reaching sigma={end} to its callback")


__all__ = ["SAMPLERS", "FittedCoefficients", "initial_noise", "SamplerInfo", "get_sampler", "randn_like", "register", "sample", "seeded_generators", "start_scale"]
