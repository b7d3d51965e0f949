"""Samplers under one contract: `fn(denoiser, x, sigmas, *, generator, callback, progress, **options)`.

`x` enters as noise already scaled for `sigmas[0]`; `sigmas` is descending and ends in 0. Samplers
never know how the network is parameterised; stochastic ones draw only from `generator`.
"""

from __future__ import annotations

from torch import Tensor

from . import ancestral, classic, dpm_solver, ode, unipc  # noqa: F401  (each module registers its samplers)
from .common import initial_noise, randn_like, seeded_generators
from .registry import SAMPLERS, SamplerInfo, get_sampler, register


def sample(denoiser, x: Tensor, sigmas: Tensor, method: str = "ddim", *, generator=None, callback=None,
           progress: bool = False, **options) -> Tensor:
    """Run the sampler `method` (any name in `SAMPLERS`) from x at sigmas[0] down to sigma = 0.
    Conditioning for the denoiser goes in `cond={...}`; other options are the sampler's own."""
    return get_sampler(method).fn(denoiser, x, sigmas, generator=generator, callback=callback,
                                  progress=progress, **options)


__all__ = ["SAMPLERS", "initial_noise", "SamplerInfo", "get_sampler", "randn_like", "register", "sample", "seeded_generators"]
