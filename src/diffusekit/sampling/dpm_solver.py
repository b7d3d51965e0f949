"""The DPM-Solver family (Lu et al. 2022a, 2022b): exponential integrators in lambda = -log(sigma).

In sigma space the data-prediction (DPM-Solver++) step from sigma to sigma_next = sigma e^-h is
x_next = (sigma_next / sigma) x - expm1(-h) D_hat, with D_hat an extrapolation of the denoiser's
outputs; the SDE variants shrink x by a further e^(-eta h) and add noise of std
sigma_next sqrt(1 - e^(-2 eta h)). Every step to sigma = 0 is the denoised step x = D(x, sigma),
so no step takes log(0).

Noise comes only from the caller's generator. k-diffusion drives `dpmpp_sde` with a Brownian tree
(torchsde); here the Brownian path is built from independent increments drawn from the generator,
which has the same law for a given sigma sequence (the tree only adds consistency across different
step sizes for one seed).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm, trange

from .common import (ancestral_step, check_nonnegative, check_option, check_sigmas, denoise, randn_like,
                     report)
from .registry import register


@register("dpmpp_2s_ancestral", nfe=lambda n: 2 * n - 3, stochastic=True)
@torch.no_grad()
def dpmpp_2s_ancestral(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, progress=False,
                       cond: dict | None = None, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """DPM-Solver++(2S) single-step second order to sigma_down, then ancestral noise of std
    s_noise * sigma_up (eta = 0: the deterministic 2S solver). NFE = 2 len(sigmas) - 3 for eta <= 1."""
    sigmas = check_sigmas(x, sigmas).tolist()
    check_nonnegative(eta=eta, s_noise=s_noise)
    for i in trange(len(sigmas) - 1, disable=not progress, desc="dpmpp_2s_ancestral"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_down)
            sigma_mid = math.sqrt(sigma * sigma_down)
            x_2 = (sigma_mid / sigma) * x - math.expm1(-h / 2) * denoised
            x = (sigma_down / sigma) * x - math.expm1(-h) * denoise(denoiser, x_2, sigma_mid, cond)
        if sigma_up > 0:
            x = x + randn_like(x, generator) * (s_noise * sigma_up)
        report(callback, i, x, sigma, sigma_next, denoised)
    return x


@register("dpmpp_sde", nfe=lambda n: 2 * n - 3, stochastic=True)
@torch.no_grad()
def dpmpp_sde(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, progress=False,
              cond: dict | None = None, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5) -> Tensor:
    """DPM-Solver++ SDE (k-diffusion's `dpmpp_sde`): a stochastic 2-stage step with the
    intermediate stage at sigma e^(-r h); both stages add ancestral noise (eta) along one Brownian
    path in sigma, built from two independent increments per step drawn from `generator`.
    NFE = 2 len(sigmas) - 3."""
    sigmas = check_sigmas(x, sigmas).tolist()
    check_nonnegative(eta=eta, s_noise=s_noise)
    if not 0 < r < 1:
        raise ValueError(f"r must lie in (0, 1), got {r}")
    for i in trange(len(sigmas) - 1, disable=not progress, desc="dpmpp_sde"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        if sigma_next == 0:
            x = denoised
        else:
            sigma_mid = sigma * (sigma_next / sigma) ** r
            # W(sigma_mid) - W(sigma) and W(sigma_next) - W(sigma), normalised, from independent increments
            z_1 = randn_like(x, generator) if eta > 0 else None
            sigma_down, sigma_up = ancestral_step(sigma, sigma_mid, eta)
            x_2 = (sigma_down / sigma) * x + (1 - sigma_down / sigma) * denoised
            if sigma_up > 0:
                x_2 = x_2 + z_1 * (s_noise * sigma_up)
            denoised_2 = denoise(denoiser, x_2, sigma_mid, cond)
            fac = 1 / (2 * r)
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
            x = (sigma_down / sigma) * x + (1 - sigma_down / sigma) * ((1 - fac) * denoised + fac * denoised_2)
            if sigma_up > 0:
                w_1, w_2 = sigma - sigma_mid, sigma_mid - sigma_next
                z = (math.sqrt(w_1) * z_1 + math.sqrt(w_2) * randn_like(x, generator)) / math.sqrt(w_1 + w_2)
                x = x + z * (s_noise * sigma_up)
        report(callback, i, x, sigma, sigma_next, denoised)
    return x


@register("dpmpp_2m", nfe=lambda n: n - 1, stochastic=False)
@torch.no_grad()
def dpmpp_2m(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, progress=False,
             cond: dict | None = None) -> Tensor:
    """DPM-Solver++(2M): second-order multistep with the previous step's denoised output (first
    order on the first step and on the step to sigma = 0). NFE = len(sigmas) - 1."""
    return dpmpp_2m_sde(denoiser, x, sigmas, generator=generator, callback=callback, progress=progress,
                        cond=cond, eta=0.0)


@register("dpmpp_2m_sde", nfe=lambda n: n - 1, stochastic=True)
@torch.no_grad()
def dpmpp_2m_sde(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, progress=False,
                 cond: dict | None = None, eta: float = 1.0, s_noise: float = 1.0,
                 solver_type: str = "midpoint") -> Tensor:
    """DPM-Solver++(2M) SDE (diffusers' `sde-dpmsolver++`, k-diffusion's `dpmpp_2m_sde`); eta = 0
    is DPM-Solver++(2M). `solver_type` "midpoint" or "heun" weighs the second-order term.
    NFE = len(sigmas) - 1."""
    sigmas = check_sigmas(x, sigmas).tolist()
    check_nonnegative(eta=eta, s_noise=s_noise)
    check_option("solver_type", solver_type, ("midpoint", "heun"))
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=not progress, desc="dpmpp_2m_sde" if eta else "dpmpp_2m"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            h_eta = h * (1 + eta)
            x = (sigma_next / sigma * math.exp(-eta * h)) * x - math.expm1(-h_eta) * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    coeff = -math.expm1(-h_eta) / -h_eta + 1
                else:
                    coeff = -0.5 * math.expm1(-h_eta)
                x = x + (coeff / r) * (denoised - old_denoised)
            if eta > 0:
                x = x + randn_like(x, generator) * (sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise)
            h_last = h
        old_denoised = denoised
        report(callback, i, x, sigma, sigma_next, denoised)
    return x


@register("dpmpp_3m_sde", nfe=lambda n: n - 1, stochastic=True)
@torch.no_grad()
def dpmpp_3m_sde(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, progress=False,
                 cond: dict | None = None, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion's `dpmpp_3m_sde`): third-order multistep in the denoised
    outputs, orders 1 and 2 on the first two steps; eta = 0 is DPM-Solver++(3M) (diffusers'
    DPMSolverMultistepScheduler with solver_order=3, solver_type="heun"). NFE = len(sigmas) - 1."""
    sigmas = check_sigmas(x, sigmas).tolist()
    check_nonnegative(eta=eta, s_noise=s_noise)
    denoised_1 = denoised_2 = h_1 = h_2 = None
    for i in trange(len(sigmas) - 1, disable=not progress, desc="dpmpp_3m_sde"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            h_eta = h * (1 + eta)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r_0, r_1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r_0
                d1_1 = (denoised_1 - denoised_2) / r_1
                d_1 = d1_0 + (d1_0 - d1_1) * (r_0 / (r_0 + r_1))
                d_2 = (d1_0 - d1_1) / (r_0 + r_1)
                x = x + phi_2 * d_1 - (phi_2 / h_eta - 0.5) * d_2
            elif h_1 is not None:
                x = x + (phi_2 * h / h_1) * (denoised - denoised_1)
            if eta > 0:
                x = x + randn_like(x, generator) * (sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise)
            h_1, h_2 = h, h_1
        denoised_1, denoised_2 = denoised, denoised_1
        report(callback, i, x, sigma, sigma_next, denoised)
    return x


class _PIDStepSize:
    """PID step-size control (Söderlind 2003, as in k-diffusion's DPM-Solver adaptive): accept a
    step when the limited factor is >= accept_safety; the step size is multiplied by it either way."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8):
        self.h, self.accept_safety, self.eps = h, accept_safety, eps
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.errs: list[float] = []

    def propose(self, error: float) -> bool:
        inv = 1 / (error + self.eps)
        if not self.errs:
            self.errs = [inv, inv, inv]
        self.errs[0] = inv
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


@register("dpm_adaptive", nfe=lambda n: None, stochastic=False)
@torch.no_grad()
def dpm_adaptive(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, progress=False,
                 cond: dict | None = None, order: int = 3, rtol: float = 0.05, atol: float = 0.0078,
                 h_init: float = 0.05, pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0,
                 accept_safety: float = 0.81, eta: float = 0.0, s_noise: float = 1.0,
                 max_steps: int = 10_000, info: dict | None = None) -> Tensor:
    """DPM-Solver-12 / -23 with adaptive step size (Lu et al. 2022, section 4.2; k-diffusion's
    `sample_dpm_adaptive`): each step in lambda = -log(sigma) computes an order-`order` (2 or 3)
    and an order-(order - 1) solution, and a PID controller sizes the next step from their
    difference against rtol / atol (RMS over the whole batch, so the step sequence is shared by the
    batch). Only sigmas[0] and the last nonzero sigma are used; a final step denoises there.
    eta > 0 adds ancestral noise from `generator`. NFE is data-dependent: `order` per attempted
    step plus 1; pass `info={}` to receive nfe / n_accept / n_reject."""
    sigmas = check_sigmas(x, sigmas).tolist()
    check_option("order", order, (2, 3))
    check_nonnegative(eta=eta, s_noise=s_noise, rtol=rtol, atol=atol, pcoeff=pcoeff, icoeff=icoeff, dcoeff=dcoeff)
    if not h_init > 0:
        raise ValueError(f"h_init must be > 0, got {h_init}")
    counts = {"nfe": 0, "n_accept": 0, "n_reject": 0}
    bar = tqdm(disable=not progress, desc="dpm_adaptive")

    def eps(x_: Tensor, lam: float) -> Tensor:
        counts["nfe"] += 1
        bar.update(1)
        return (x_ - denoise(denoiser, x_, math.exp(-lam), cond)) * math.exp(lam)

    def dpm_steps(x_: Tensor, lam: float, lam_next: float, e_0: Tensor) -> tuple[Tensor, Tensor]:
        """(lower-order, higher-order) solutions at lam_next, sharing model evaluations."""
        h = lam_next - lam
        sigma_next = math.exp(-lam_next)
        first = x_ - sigma_next * math.expm1(h) * e_0
        r_1 = 1 / 2 if order == 2 else 1 / 3
        u_1 = x_ - math.exp(-(lam + r_1 * h)) * math.expm1(r_1 * h) * e_0
        e_1 = eps(u_1, lam + r_1 * h)
        second = first - sigma_next / (2 * r_1) * math.expm1(h) * (e_1 - e_0)
        if order == 2:
            return first, second
        r_2 = 2 / 3
        u_2 = (x_ - math.exp(-(lam + r_2 * h)) * math.expm1(r_2 * h) * e_0
               - math.exp(-(lam + r_2 * h)) * (r_2 / r_1) * (math.expm1(r_2 * h) / (r_2 * h) - 1) * (e_1 - e_0))
        e_2 = eps(u_2, lam + r_2 * h)
        third = first - sigma_next / r_2 * (math.expm1(h) / h - 1) * (e_2 - e_0)
        return second, third

    sigma_min = sigmas[-2]
    lam, lam_end = -math.log(sigmas[0]), -math.log(sigma_min)
    pid = _PIDStepSize(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    x_prev = x
    while lam < lam_end - 1e-5:
        if counts["n_accept"] + counts["n_reject"] >= max_steps:
            raise RuntimeError(f"dpm_adaptive took more than max_steps={max_steps} steps; loosen rtol/atol")
        lam_next = min(lam_end, lam + pid.h)
        sigma, sigma_next = math.exp(-lam), math.exp(-lam_next)
        lam_down, sigma_up = lam_next, 0.0
        if eta:
            sigma_down, _ = ancestral_step(sigma, sigma_next, eta)
            lam_down = min(lam_end, -math.log(sigma_down)) if sigma_down > 0 else lam_end
            sigma_up = math.sqrt(max(sigma_next**2 - math.exp(-2 * lam_down), 0.0))
        e_0 = eps(x, lam)
        denoised = x - sigma * e_0
        low, high = dpm_steps(x, lam, lam_down, e_0)
        delta = torch.maximum(torch.full_like(low, atol), rtol * torch.maximum(low.abs(), x_prev.abs()))
        error = float(torch.linalg.vector_norm((low - high) / delta)) / math.sqrt(x.numel())
        if not math.isfinite(error):
            raise RuntimeError("dpm_adaptive: the error estimate is not finite (does the denoiser return NaN?)")
        if pid.propose(error):
            x_prev = low
            x = high if sigma_up == 0 else high + randn_like(x, generator) * (s_noise * sigma_up)
            report(callback, counts["n_accept"], x, sigma, sigma_next, denoised)
            counts["n_accept"] += 1
            lam = lam_next
        else:
            counts["n_reject"] += 1
    denoised = denoise(denoiser, x, sigma_min, cond)
    counts["nfe"] += 1
    bar.update(1)
    bar.close()
    report(callback, counts["n_accept"], denoised, sigma_min, 0.0, denoised)
    if info is not None:
        info.update(counts)
    return denoised
