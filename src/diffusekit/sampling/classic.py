"""DDPM and DDIM (Ho et al. 2020; Song et al. 2021) in sigma space.

With x = x_vp / sqrt(abar) both become one formula: denoise, then step from x0_hat towards the
current noise direction and add fresh noise. DDIM with eta = 0 is exactly Euler's method on the
probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma; eta = 1 and DDPM's "small" variance
are the exact posterior q(x_next | x, x0), for strided steps too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import trange

from .common import ancestral_step, check_sigmas, denoise, randn_like, report
from .registry import register


@register("ddim", nfe=lambda n: n - 1, stochastic=False)
@torch.no_grad()
def ddim(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, progress=False,
         eta: float = 0.0, s_noise: float = 1.0, cond: dict | None = None) -> Tensor:
    """DDIM. `eta` = 0: deterministic; eta = 1: DDPM-like ancestral sampling. NFE = len(sigmas) - 1."""
    sigmas = check_sigmas(x, sigmas).tolist()
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    for i in trange(len(sigmas) - 1, disable=not progress, desc="ddim"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0_hat = denoise(denoiser, x, sigma, cond)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x0_hat + (sigma_down / sigma) * (x - x0_hat)
        if sigma_up > 0:
            x = x + randn_like(x, generator) * (s_noise * sigma_up)
        report(callback, i, x, sigma, sigma_next, x0_hat)
    return x


@register("ddpm", nfe=lambda n: n - 1, stochastic=True)
@torch.no_grad()
def ddpm(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, progress=False,
         variance: str = "small", s_noise: float = 1.0, cond: dict | None = None) -> Tensor:
    """DDPM ancestral sampling: x_next ~ N(posterior mean, variance) with x0 replaced by D(x, sigma).

    `variance="small"` is the posterior variance beta_tilde (DDPM eq. 7), computed for the actual
    stride between the two noise levels; `"large"` is the step's beta = 1 - abar_t / abar_next.
    Use all T steps (`schedule.get_sigmas(T, "trailing")`) or any strided subset. NFE = len(sigmas) - 1.
    """
    sigmas = check_sigmas(x, sigmas).tolist()
    if variance not in ("small", "large"):
        raise ValueError(f"unknown variance {variance!r}; valid: small, large")
    for i in trange(len(sigmas) - 1, disable=not progress, desc="ddpm"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0_hat = denoise(denoiser, x, sigma, cond)
        # posterior mean in sigma space: x0 + (sigma_next^2 / sigma^2) (x - x0)
        x = x0_hat + (sigma_next**2 / sigma**2) * (x - x0_hat)
        if sigma_next > 0:
            if variance == "small":
                std = sigma_next * math.sqrt(sigma**2 - sigma_next**2) / sigma
            else:  # beta / abar_next, with beta = 1 - abar / abar_next
                std = math.sqrt((sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2))
            x = x + randn_like(x, generator) * (s_noise * std)
        report(callback, i, x, sigma, sigma_next, x0_hat)
    return x
