"""A Gaussian-mixture data distribution with everything in closed form: the ground truth for
sampler tests and benchmarks.

Noising a mixture with sigma keeps it a mixture (each component's variance grows by sigma^2), so
the noised density, the score and the exact denoiser E[x0 | x] are all exact. The probability-flow
ODE has no closed form for a mixture; `ode_solve` integrates it with an adaptive Dormand-Prince
5(4) method in float64 to tolerances far below any sampler's error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from .schedules import NoiseSchedule

# Dormand & Prince (1980) RK5(4)7M tableau: nodes, stage weights, 5th-order and 4th-order weights.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


class GaussianMixture:
    """sum_k w_k N(mu_k, diag(s_k^2)) in D dimensions, held in float64.

    means: [K, D]; stds: [K, D], [K] or a float; weights: [K] (normalised here; default uniform).
    """

    def __init__(self, means, stds=1.0, weights=None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape [K, D], got {tuple(means.shape)}")
        k, d = means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.ndim == 1 and stds.shape[0] == k:
            stds = stds[:, None]
        try:
            stds = stds.expand(k, d).clone()
        except RuntimeError:
            raise ValueError(f"stds must be a float, [K] or [K, D] = [{k}, {d}], got {tuple(stds.shape)}") from None
        if (stds < 0).any():
            raise ValueError("stds must be >= 0")
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or (weights <= 0).any():
            raise ValueError(f"weights must be {k} positive numbers")
        self.means, self.stds, self.weights = means, stds, weights / weights.sum()

    @classmethod
    def from_json(cls, path) -> "GaussianMixture":
        """A spec file `{"means": [[...], ...], "stds": ..., "weights": [...]}`."""
        try:
            spec = json.loads(Path(path).read_text())
            return cls(spec["means"], spec.get("stds", 1.0), spec.get("weights"))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read mixture spec {path}: {e}; expected JSON with means/stds/weights") from None

    @classmethod
    def random(cls, dim: int, num_components: int, *, seed: int = 0, spread: float = 2.0,
               std_range=(0.05, 0.5)) -> "GaussianMixture":
        """A random mixture: means ~ N(0, spread^2), stds uniform in std_range, Dirichlet-ish weights."""
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(num_components, dim, generator=g, dtype=torch.float64) * spread
        lo, hi = std_range
        stds = lo + (hi - lo) * torch.rand(num_components, dim, generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(num_components, generator=g, dtype=torch.float64)
        return cls(means, stds, weights)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    # -- the distribution ------------------------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples, float64 [n, D]."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k] * z

    def _component_log_probs(self, x: Tensor, sigma) -> tuple[Tensor, Tensor]:
        """log(w_k N(x; mu_k, s_k^2 + sigma^2)) [n, K] and the variances [n, K, D]."""
        x = torch.as_tensor(x, dtype=torch.float64).reshape(-1, self.dim)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1)
        var = self.stds**2 + sigma**2  # [n or 1, K, D]
        diff = x[:, None, :] - self.means
        log_n = -0.5 * (diff**2 / var + var.log() + math.log(2 * math.pi)).sum(-1)
        return self.weights.log() + log_n, var

    def log_prob(self, x: Tensor, sigma=0.0) -> Tensor:
        """log density of the mixture noised to level sigma (sigma = 0: the data), [n]."""
        log_p, _ = self._component_log_probs(x, sigma)
        return torch.logsumexp(log_p, -1)

    def denoise(self, x: Tensor, sigma) -> Tensor:
        """The exact denoiser E[x0 | x0 + sigma eps = x], in float64."""
        shape = x.shape
        x64 = torch.as_tensor(x, dtype=torch.float64).reshape(-1, self.dim)
        log_p, var = self._component_log_probs(x64, sigma)
        resp = torch.softmax(log_p, -1)  # p(k | x)
        # per component: E[x0 | x, k] = mu + s^2 / (s^2 + sigma^2) (x - mu)
        posterior_means = self.means + self.stds**2 / var * (x64[:, None, :] - self.means)
        return (resp[..., None] * posterior_means).sum(1).reshape(shape)

    def score(self, x: Tensor, sigma) -> Tensor:
        """grad_x log p_sigma(x) = (E[x0 | x] - x) / sigma^2 (Tweedie)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
        return (self.denoise(x, sigma.flatten()) - x.to(torch.float64)) / sigma**2

    # -- as a model ------------------------------------------------------------------------------

    def denoiser(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        """The exact denoiser under the sampler contract: D(x, sigma) -> x0_hat, in x's dtype."""
        return self.denoise(x, sigma).to(x.dtype)

    def eps_network(self, schedule: NoiseSchedule) -> nn.Module:
        """The exact eps-prediction network of a discrete VP model with this data: takes
        (x_t, t) like a DDPM U-Net (x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t fractional allowed)."""
        return _MixtureEpsNetwork(self, schedule)

    # -- the probability-flow ODE ----------------------------------------------------------------

    def ode_solve(self, x: Tensor, sigma_start: float, sigma_end: float = 0.0, *, rtol: float = 1e-9,
                  atol: float = 1e-9, sigma_floor: float = 1e-7) -> Tensor:
        """Integrate dx/dsigma = (x - D(x, sigma)) / sigma from sigma_start down to sigma_end.

        Solved in u = log(sigma), where dx/du = x - D(x, e^u) is smooth. For sigma_end = 0 the
        integration stops at `sigma_floor` and returns D(x, sigma_floor), which is the ODE's
        endpoint to O(sigma_floor^2) for components with positive std (O(sigma_floor) otherwise).
        """
        if not sigma_start > sigma_end >= 0:
            raise ValueError(f"need sigma_start > sigma_end >= 0, got {sigma_start}, {sigma_end}")
        x = torch.as_tensor(x, dtype=torch.float64)
        u0, u1 = math.log(sigma_start), math.log(max(sigma_end, sigma_floor))

        def f(u: float, y: Tensor) -> Tensor:
            return y - self.denoise(y, math.exp(u))

        y = _dormand_prince(f, x, u0, u1, rtol, atol)
        return self.denoise(y, sigma_floor) if sigma_end == 0 else y


def _dormand_prince(f, y: Tensor, t0: float, t1: float, rtol: float, atol: float, max_steps: int = 100_000) -> Tensor:
    """Adaptive RK5(4) from t0 to t1 (either direction) with a step shared across the batch and
    the error measured per sample (RMS over dimensions, worst sample)."""
    direction = 1.0 if t1 > t0 else -1.0
    t, h = t0, direction * min(abs(t1 - t0), 0.01)
    k1 = f(t, y)
    for _ in range(max_steps):
        if direction * (t1 - t) <= 0:
            return y
        h = direction * min(abs(h), abs(t1 - t))
        ks = [k1]
        for stage in range(1, 7):
            yi = y + h * sum(a * k for a, k in zip(_DP_A[stage], ks))
            ks.append(f(t + _DP_C[stage] * h, yi))
        y5 = y + h * sum(b * k for b, k in zip(_DP_B5, ks))
        err = h * sum((b5 - b4) * k for b5, b4, k in zip(_DP_B5, _DP_B4, ks))
        scale = atol + rtol * torch.maximum(y.abs(), y5.abs())
        err_norm = float((err / scale).pow(2).flatten(1).mean(1).sqrt().max())
        if err_norm <= 1.0:
            t, y, k1 = t + h, y5, ks[6]  # first-same-as-last: stage 7 is f at the new point
        factor = 0.9 * err_norm ** (-1 / 5) if err_norm > 0 else 5.0
        h *= min(5.0, max(0.2, factor))
    raise RuntimeError("ODE reference solver exceeded its step budget; loosen rtol/atol")


class _MixtureEpsNetwork(nn.Module):
    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule):
        super().__init__()
        if not schedule.is_discrete:
            raise ValueError("eps_network needs a discrete VP schedule")
        self.mixture, self.schedule = mixture, schedule

    def forward(self, x_t: Tensor, t: Tensor, **cond) -> Tensor:
        t = torch.as_tensor(t).expand(x_t.shape[0])
        sigma = self.schedule.t_to_sigma(t).to(x_t.device)
        scale = (1 + sigma**2).sqrt().reshape(-1, *([1] * (x_t.ndim - 1)))
        x = x_t.to(torch.float64) * scale
        eps = (x - self.mixture.denoise(x, sigma)) / sigma.reshape(scale.shape)
        return eps.to(x_t.dtype)
