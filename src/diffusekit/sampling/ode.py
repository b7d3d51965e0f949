"""Solvers of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma = eps (Karras et al. 2022).

Single-step: `euler`, `heun` and `dpm2` (the last two with EDM's stochastic churn). Multistep, one
model evaluation per step after a warm-up: `lms` (Adams-Bashforth with the Lagrange polynomial of
eps in sigma, as k-diffusion and diffusers), `deis` (the polynomial in log sigma, Zhang & Chen 2023),
`ipndm` (Adams-Bashforth with the fixed equal-step coefficients, Zhang & Chen's improved PNDM) and
`pndm` / `plms` (Liu et al. 2022, with a Runge-Kutta or a pseudo-Heun first step).

The step to sigma = 0 never divides by it: `euler`, `heun`, `dpm2`, `ipndm` and `deis` take the
first-order step there, which is x = D(x, sigma) (as k-diffusion does); `lms`, `pndm` and `plms`
integrate their polynomial down to 0, as their references do.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import trange

from .common import (check_nonnegative, check_option, check_sigmas, churn, churn_gamma, denoise,
                     lagrange_weights, report, to_d)
from .registry import register

# Adams-Bashforth weights for equal steps, newest derivative first.
ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                   4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _combine(weights, ds) -> Tensor:
    """sum_j w_j d_j with ds oldest first and weights newest first."""
    return sum(w * d for w, d in zip(weights, reversed(ds)))


def _check_churn(s_churn: float, s_noise: float) -> None:
    check_nonnegative(s_churn=s_churn, s_noise=s_noise)


@register("euler", nfe=lambda n: n - 1, stochastic=False)
@torch.no_grad()
def euler(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, progress=False,
          cond: dict | None = None, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
          s_noise: float = 1.0) -> Tensor:
    """Euler's method (Karras et al. 2022, Algorithm 2 without its correction; `s_churn` > 0 adds
    EDM's churn noise from `generator`). NFE = len(sigmas) - 1."""
    sigmas = check_sigmas(x, sigmas).tolist()
    _check_churn(s_churn, s_noise)
    n = len(sigmas) - 1
    for i in trange(n, disable=not progress, desc="euler"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, sigma_hat = churn(x, sigma, churn_gamma(sigma, n, s_churn, s_tmin, s_tmax), s_noise, generator)
        denoised = denoise(denoiser, x, sigma_hat, cond)
        x = x + to_d(x, sigma_hat, denoised) * (sigma_next - sigma_hat)
        report(callback, i, x, sigma, sigma_next, denoised)
    return x


@register("heun", nfe=lambda n: 2 * n - 3, stochastic=False)
@torch.no_grad()
def heun(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, progress=False,
         cond: dict | None = None, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
         s_noise: float = 1.0) -> Tensor:
    """Heun's second-order method with EDM's stochastic churn (Karras et al. 2022, Algorithm 2:
    gamma = min(s_churn / steps, sqrt(2) - 1) for sigma in [s_tmin, s_tmax], noise from `generator`).
    The last step, to sigma = 0, is an Euler step. NFE = 2 len(sigmas) - 3."""
    sigmas = check_sigmas(x, sigmas).tolist()
    _check_churn(s_churn, s_noise)
    n = len(sigmas) - 1
    for i in trange(n, disable=not progress, desc="heun"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, sigma_hat = churn(x, sigma, churn_gamma(sigma, n, s_churn, s_tmin, s_tmax), s_noise, generator)
        denoised = denoise(denoiser, x, sigma_hat, cond)
        d = to_d(x, sigma_hat, denoised)
        dt = sigma_next - sigma_hat
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigma_next, denoise(denoiser, x_2, sigma_next, cond))
            x = x + (d + d_2) * (dt / 2)
        report(callback, i, x, sigma, sigma_next, denoised)
    return x


@register("dpm2", nfe=lambda n: 2 * n - 3, stochastic=False)
@torch.no_grad()
def dpm2(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, progress=False,
         cond: dict | None = None, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
         s_noise: float = 1.0) -> Tensor:
    """DPM-Solver-2 in k-diffusion's form: the derivative at the geometric midpoint sqrt(sigma
    sigma_next) drives the whole step (second order); EDM churn options as in `heun`. The last
    step, to sigma = 0, is an Euler step. NFE = 2 len(sigmas) - 3."""
    sigmas = check_sigmas(x, sigmas).tolist()
    _check_churn(s_churn, s_noise)
    n = len(sigmas) - 1
    for i in trange(n, disable=not progress, desc="dpm2"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, sigma_hat = churn(x, sigma, churn_gamma(sigma, n, s_churn, s_tmin, s_tmax), s_noise, generator)
        denoised = denoise(denoiser, x, sigma_hat, cond)
        d = to_d(x, sigma_hat, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma_hat)
        else:
            sigma_mid = math.sqrt(sigma_hat * sigma_next)
            x_2 = x + d * (sigma_mid - sigma_hat)
            x = x + to_d(x_2, sigma_mid, denoise(denoiser, x_2, sigma_mid, cond)) * (sigma_next - sigma_hat)
        report(callback, i, x, sigma, sigma_next, denoised)
    return x


@register("lms", nfe=lambda n: n - 1, stochastic=False)
@torch.no_grad()
def lms(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, progress=False,
        cond: dict | None = None, order: int = 4) -> Tensor:
    """Linear multistep (k-diffusion's and diffusers' LMS): integrate the Lagrange polynomial in
    sigma through the last `order` (1-4) derivatives, exactly, over each step; the order ramps up
    from 1 over the first steps. NFE = len(sigmas) - 1."""
    sigmas = check_sigmas(x, sigmas).tolist()
    check_option("order", order, (1, 2, 3, 4))
    ds: list[Tensor] = []
    for i in trange(len(sigmas) - 1, disable=not progress, desc="lms"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        ds = (ds + [to_d(x, sigma, denoised)])[-order:]
        x = x + _combine(lagrange_weights(sigmas[i - len(ds) + 1:i + 1][::-1], sigma, sigma_next), ds)
        report(callback, i, x, sigma, sigma_next, denoised)
    return x


@register("deis", nfe=lambda n: n - 1, stochastic=False)
@torch.no_grad()
def deis(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, progress=False,
         cond: dict | None = None, order: int = 2, lower_order_final: bool = True) -> Tensor:
    """DEIS, multistep log-rho (Zhang & Chen 2023; diffusers' DEISMultistepScheduler): the
    exponential integrator in sigma space is x' = eps, and eps is extrapolated by the Lagrange
    polynomial in log sigma through the last `order` (1-3) steps, integrated exactly. The order ramps
    up over the first steps and, with `lower_order_final`, down to the number of steps left; the step
    to sigma = 0 is first-order (x = D). NFE = len(sigmas) - 1."""
    sigmas = check_sigmas(x, sigmas).tolist()
    check_option("order", order, (1, 2, 3))
    n = len(sigmas) - 1
    ds: list[Tensor] = []
    for i in trange(n, disable=not progress, desc="deis"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        ds = (ds + [to_d(x, sigma, denoised)])[-order:]
        if sigma_next == 0:
            x = denoised
        else:
            k = min(len(ds), n - i) if lower_order_final else len(ds)
            x = x + _combine(lagrange_weights(sigmas[i - k + 1:i + 1][::-1], sigma, sigma_next, log=True), ds[-k:])
        report(callback, i, x, sigma, sigma_next, denoised)
    return x


@register("ipndm", nfe=lambda n: n - 1, stochastic=False)
@torch.no_grad()
def ipndm(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, progress=False,
          cond: dict | None = None, order: int = 4) -> Tensor:
    """Improved PNDM (Zhang & Chen 2023, as k-diffusion's `sample_ipndm`): Adams-Bashforth of
    `order` (1-4) on eps with the fixed equal-step weights, starting with lower orders instead of
    PNDM's Runge-Kutta steps; the step to sigma = 0 is first-order (x = D). The fixed weights are
    exact for steps equal in sigma; on the usual uneven schedules the method is second order.
    NFE = len(sigmas) - 1."""
    sigmas = check_sigmas(x, sigmas).tolist()
    check_option("order", order, (1, 2, 3, 4))
    ds: list[Tensor] = []
    for i in trange(len(sigmas) - 1, disable=not progress, desc="ipndm"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        ds = (ds + [to_d(x, sigma, denoised)])[-order:]
        x = denoised if sigma_next == 0 else x + (sigma_next - sigma) * _combine(ADAMS_BASHFORTH[len(ds)], ds)
        report(callback, i, x, sigma, sigma_next, denoised)
    return x


def _pndm(denoiser, x: Tensor, sigmas: Tensor, warmup: str, callback, progress, cond, sigmas_mid) -> Tensor:
    sigmas = check_sigmas(x, sigmas).tolist()
    warmup_steps = {"rk4": 3, "heun": 1}[warmup]
    if sigmas_mid is not None:
        sigmas_mid = [float(s) for s in sigmas_mid]
        if len(sigmas_mid) < min(warmup_steps, len(sigmas) - 2):
            raise ValueError(f"sigmas_mid needs one noise level per Runge-Kutta step ({warmup_steps}), got {len(sigmas_mid)}")
    ds: list[Tensor] = []
    for i in trange(len(sigmas) - 1, disable=not progress, desc="pndm" if warmup == "rk4" else "plms"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        dt = sigma_next - sigma
        denoised = denoise(denoiser, x, sigma, cond)
        d = to_d(x, sigma, denoised)
        if i < warmup_steps and sigma_next > 0 and warmup == "heun":  # pseudo improved Euler
            x_2 = x + d * dt
            x = x + (d + to_d(x_2, sigma_next, denoise(denoiser, x_2, sigma_next, cond))) * (dt / 2)
            ds.append(d)
        elif i < warmup_steps and sigma_next > 0:  # classical Runge-Kutta 4 in sigma
            sigma_mid = sigmas_mid[i] if sigmas_mid is not None else (sigma + sigma_next) / 2
            x_2 = x + d * (sigma_mid - sigma)
            d_2 = to_d(x_2, sigma_mid, denoise(denoiser, x_2, sigma_mid, cond))
            x_3 = x + d_2 * (sigma_mid - sigma)
            d_3 = to_d(x_3, sigma_mid, denoise(denoiser, x_3, sigma_mid, cond))
            x_4 = x + d_3 * dt
            d_4 = to_d(x_4, sigma_next, denoise(denoiser, x_4, sigma_next, cond))
            x = x + (d + 2 * d_2 + 2 * d_3 + d_4) * (dt / 6)
            ds.append(d)
        else:
            ds = (ds + [d])[-4:]
            x = x + dt * _combine(ADAMS_BASHFORTH[len(ds)], ds)
        report(callback, i, x, sigma, sigma_next, denoised)
    return x


@register("pndm", nfe=lambda n: n - 1 + 3 * min(3, n - 2), stochastic=False)
@torch.no_grad()
def pndm(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, progress=False,
         cond: dict | None = None, sigmas_mid=None) -> Tensor:
    """PNDM (Liu et al. 2022; diffusers' PNDMScheduler): three Runge-Kutta-4 steps (4 evaluations
    each) then 4th-order Adams-Bashforth with equal-step weights. Every step is the DDIM transfer
    x + (sigma_next - sigma) eps of a combined eps. `sigmas_mid` gives the three warm-up midpoints
    (diffusers uses the noise level half a timestep stride down); the default, the mean of the two
    ends, is classical RK4 in sigma. NFE = len(sigmas) - 1 + 3 min(3, len(sigmas) - 2)."""
    return _pndm(denoiser, x, sigmas, "rk4", callback, progress, cond, sigmas_mid)


@register("plms", nfe=lambda n: n - 1 + min(1, n - 2), stochastic=False)
@torch.no_grad()
def plms(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, progress=False,
         cond: dict | None = None) -> Tensor:
    """PLMS (PNDM without the Runge-Kutta steps; diffusers' `skip_prk_steps=True`, latent
    diffusion's PLMS): one pseudo improved-Euler step, then Adams-Bashforth of rising order up to 4
    on eps with equal-step weights. NFE = len(sigmas) (len(sigmas) - 1 for a single step)."""
    return _pndm(denoiser, x, sigmas, "heun", callback, progress, cond, None)
