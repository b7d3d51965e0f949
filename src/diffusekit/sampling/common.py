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
    return randn_like(torch.empty(shape, dtype=dtype, device=device), generator) * start_scale(sigma_max, variance_preserving)


def start_scale(sigma_max: float, variance_preserving: bool) -> float:
    """What standard normal noise is multiplied by to start at sigma_max (see `initial_noise`)."""
    return math.sqrt(1 + sigma_max**2) if variance_preserving else sigma_max


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


# ---------------------------------------------------------------------------------------------
# Helpers the sampler modules share (one way to do each thing)
# ---------------------------------------------------------------------------------------------


def denoise(denoiser, x: Tensor, sigma: float, cond: dict | None) -> Tensor:
    """One model evaluation D(x, sigma, **cond) at a python-float noise level."""
    return denoiser(x, sigma_vector(x, sigma), **(cond or {}))


def report(callback, i: int, x: Tensor, sigma: float, sigma_next: float, denoised: Tensor) -> None:
    """Call the user's callback (if any) after step i with the sampler contract's dict."""
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})


def to_d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """The probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al.
    2022, eq. 4 with sigma(t) = t). It is also the model's noise estimate eps."""
    return (x - denoised) / sigma


def check_option(name: str, value, valid) -> None:
    """ValueError naming the option when `value` is not one of `valid`."""
    if value not in valid:
        raise ValueError(f"unsupported {name}={value!r}; valid: {', '.join(map(str, valid))}")


def check_nonnegative(**options: float) -> None:
    """ValueError naming the option when a float option (eta, s_noise, s_churn, ...) is negative or NaN."""
    for name, value in options.items():
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def churn(x: Tensor, sigma: float, gamma: float, s_noise: float, generator: Generators) -> tuple[Tensor, float]:
    """EDM's stochastic churn (Karras et al. 2022, Algorithm 2, lines 5-6): raise the noise level
    to sigma_hat = sigma (1 + gamma) by adding fresh noise of std sqrt(sigma_hat^2 - sigma^2)."""
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + randn_like(x, generator) * (s_noise * math.sqrt(sigma_hat**2 - sigma**2)), sigma_hat


def churn_gamma(sigma: float, num_steps: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """EDM's gamma_i = min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax], else 0."""
    return min(s_churn / num_steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0


def _lagrange_basis(node: float, others: list[float]) -> np.polynomial.Polynomial:
    """The polynomial that is 1 at `node` and 0 at each of `others`."""
    if not others:
        return np.polynomial.Polynomial([1.0])
    return np.polynomial.Polynomial.fromroots(others) / float(np.prod([node - m for m in others]))


def lagrange_weights(nodes: Sequence[float], start: float, end: float, *, log: bool = False) -> list[float]:
    """w_j = integral from `start` to `end` of L_j d(sigma), where L_j is the Lagrange basis
    polynomial through `nodes` (noise levels) in the variable sigma (`log=False`: linear multistep,
    Adams-Bashforth with variable steps) or log(sigma) (`log=True`: DEIS's log-rho polynomial).

    Both integrals are exact: a polynomial integrates term by term, and in u = log(sigma) - log(start)
    the integral of p(u) e^u du is e^u (p - p' + p'' - ...). `end` may be 0 only with `log=False`."""
    weights = []
    if not log:  # in tau = sigma - start, so the antiderivative is 0 at the start
        taus = [s - start for s in nodes]
        for j, node in enumerate(taus):
            others = [m for k, m in enumerate(taus) if k != j]
            p = _lagrange_basis(node, others)
            weights.append(float(p.integ()(end - start)))
        return weights
    u_nodes = [math.log(s / start) for s in nodes]
    u_end = math.log(end / start)
    for j, node in enumerate(u_nodes):
        others = [m for k, m in enumerate(u_nodes) if k != j]
        p = _lagrange_basis(node, others)
        antiderivative = sum(((-1) ** m) * p.deriv(m) for m in range(len(nodes)))  # (p - p' + ...)
        weights.append(float(start * (math.exp(u_end) * antiderivative(u_end) - antiderivative(0.0))))
    return weights
