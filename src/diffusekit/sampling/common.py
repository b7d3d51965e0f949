"""What every sampler shares: input checks, noise from the caller's generators, the ancestral split."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

Generators = torch.Generator | Sequence[torch.Generator] | None


def check_sigmas(x: Tensor, sigmas: Tensor) -> Tensor:
    """Validate the sampler contract's `sigmas` (1-D, finite, strictly descending, ending in 0)."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 noise levels, got shape {tuple(sigmas.shape)}")
    if not torch.isfinite(sigmas).all():
        raise ValueError("sigmas must be finite")
    if sigmas[-1] != 0:
        raise ValueError(f"sigmas must end in 0, got last value {float(sigmas[-1])}; append a zero")
    if not (sigmas[:-1] > sigmas[1:]).all():
        raise ValueError("sigmas must be strictly descending")
    if not torch.is_floating_point(x) or x.ndim < 1:
        raise ValueError(f"x must be a floating-point tensor [B, ...], got {x.dtype} of shape {tuple(x.shape)}")
    return sigmas


def seeded_generators(seed: int, n: int, *, start: int = 0, device="cpu") -> list[torch.Generator]:
    """One generator per sample, so that sample i of a request with seed s is the same whatever the
    batch size or how many samples are asked for (DESIGN.md contract 7). Streams come from numpy's
    SeedSequence([seed, i]), which keeps them independent across seeds and indices."""
    gens = []
    for i in range(start, start + n):
        state = int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0] >> 1)
        gens.append(torch.Generator(device=device).manual_seed(state))
    return gens


def randn_like(x: Tensor, generator: Generators = None) -> Tensor:
    """Standard normal noise shaped like x, drawn from one generator or one generator per sample."""
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else x.device
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}; give one per sample")
    return torch.stack(
        [torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=g.device) for g in generator]
    ).to(x.device)


def initial_noise(shape, sigma_max: float, *, variance_preserving: bool, generator: Generators = None,
                  dtype=torch.float32, device="cpu") -> Tensor:
    """The starting point for `sigmas[0] = sigma_max`: `noise * sqrt(1 + sigma_max^2)` for a
    variance-preserving model (its x_T = noise, seen in sigma space), `noise * sigma_max` for a
    variance-exploding one."""
    scale = math.sqrt(1 + sigma_max**2) if variance_preserving else sigma_max
    return randn_like(torch.empty(shape, dtype=dtype, device=device), generator) * scale


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma -> sigma_next into a deterministic move to sigma_down and fresh noise of
    std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2. eta = 1 is the exact posterior
    q(x_next | x, x0) (the DDPM step in sigma space); eta = 0 is deterministic (DDIM / Euler)."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def sigma_vector(x: Tensor, sigma: float) -> Tensor:
    """The per-sample sigma tensor the denoiser contract takes."""
    return x.new_full((x.shape[0],), sigma)
