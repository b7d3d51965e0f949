"""Ancestral samplers: each step goes deterministically down to sigma_down and adds fresh noise of
std sigma_up (`common.ancestral_step`, sigma_down^2 + sigma_up^2 = sigma_next^2), drawn only from
the caller's generator. eta = 1 is the exact posterior step; eta = 0 is the underlying ODE solver.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import trange

from .classic import ddim
from .common import ancestral_step, check_nonnegative, check_sigmas, denoise, randn_like, report, to_d
from .registry import register


@register("euler_ancestral", nfe=lambda n: n - 1, stochastic=True)
@torch.no_grad()
def euler_ancestral(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, progress=False,
                    cond: dict | None = None, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """Euler ancestral (k-diffusion's name for DDIM's step with eta, default 1): an Euler step to
    sigma_down, then noise of std s_noise * sigma_up. NFE = len(sigmas) - 1."""
    check_nonnegative(eta=eta, s_noise=s_noise)
    return ddim(denoiser, x, sigmas, generator=generator, callback=callback, progress=progress,
                eta=eta, s_noise=s_noise, cond=cond)


@register("dpm2_ancestral", nfe=lambda n: 2 * n - 3, stochastic=True)
@torch.no_grad()
def dpm2_ancestral(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, progress=False,
                   cond: dict | None = None, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """DPM-Solver-2 (k-diffusion's `dpm2`) to sigma_down, then noise of std s_noise * sigma_up.
    A step whose sigma_down is 0 (the last one) is an Euler step. NFE = 2 len(sigmas) - 3 for
    eta <= 1."""
    sigmas = check_sigmas(x, sigmas).tolist()
    check_nonnegative(eta=eta, s_noise=s_noise)
    for i in trange(len(sigmas) - 1, disable=not progress, desc="dpm2_ancestral"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        d = to_d(x, sigma, denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            sigma_mid = math.sqrt(sigma * sigma_down)
            x_2 = x + d * (sigma_mid - sigma)
            x = x + to_d(x_2, sigma_mid, denoise(denoiser, x_2, sigma_mid, cond)) * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + randn_like(x, generator) * (s_noise * sigma_up)
        report(callback, i, x, sigma, sigma_next, denoised)
    return x
