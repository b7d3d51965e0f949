"""Negative log-likelihood of a diffusion model, in nats or in bits per dimension.

    from diffusekit.metrics.likelihood import bits_per_dim
    bits_per_dim(model, images, "vlb").bpd                          # [B], DDPM's bound
    bits_per_dim(model, images, "ode", generator=g).bpd             # [B], the probability-flow ODE

Two estimates, with different contracts:

- `vlb`: the DDPM variational bound (Ho et al. 2020, eq. 5) for a discrete-schedule model. It is an
  upper bound on -log p_model(x0) for the model's own ancestral sampler (fixed reverse variances),
  summed exactly over all T steps or estimated without bias from a random subset of them.
- `ode_log_likelihood`: the exact log-density (up to the solver's tolerance) of the flow model that
  the probability-flow ODE defines (Song et al. 2021), with its divergence integral taken exactly by
  autograd or by Hutchinson's estimator.

Image conventions. Pixels are `num_levels` evenly spaced levels in [-1, 1] (256 by default: level k
is -1 + 2k/255, what `images.py` and the datasets produce). Each level owns a bin of width
2 / (num_levels - 1) centred on it; the outer bins reach -inf and +inf. These are the bins of DDPM's
discretised decoder (eq. 13), so both methods measure the same thing: -log2 P(bin) per dimension.
For the ODE the pixels are dequantised uniformly inside their bins, x = level + U(-1, 1) / 255
(the outer bins stop at +-(1 + 1/255) here, which can only loosen the bound); Jensen gives
-log P(bin) <= E[-log p(x)] - D log(2/255), so

    bits/dim = (-log p(x) / D + log(127.5)) / log(2)        (an upper bound in expectation).

Song et al. instead bin [0, 1] data into 256 bins of width 1/256 before scaling to [-1, 1] (an
offset of log2(128) = 7 bits); that shifts the data off the levels the model was trained on and
changes the number by log2(128 / 127.5) = 0.0056 bits/dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import trange

from .._utils import per_sample
from ..forward import q_posterior
from ..oracle import _dormand_prince
from ..schedules import NoiseSchedule

VARIANCES = ("posterior", "beta")
DECODERS = ("discretized", "gaussian")
TRACES = ("auto", "exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
METHODS = ("vlb", "ode")
# `trace="auto"` takes the exact trace (one backward pass per dimension) up to this many dimensions
# and Hutchinson's estimator above it.
EXACT_TRACE_MAX_DIM = 64


# ---------------------------------------------------------------------------------------------
# Input checks and the pixel grid
# ---------------------------------------------------------------------------------------------


def _check_batch(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or not torch.is_floating_point(x):
        raise ValueError(f"{name} must be a floating-point tensor [B, ...]")
    if x.ndim < 2 or x.shape[0] == 0 or x[0].numel() == 0:
        raise ValueError(f"{name} must be a non-empty batch [B, ...] with B >= 1, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _check_levels(num_levels: int) -> None:
    if not isinstance(num_levels, int) or isinstance(num_levels, bool) or num_levels < 2:
        raise ValueError(f"num_levels must be an integer >= 2, got {num_levels!r}")


def _level_indices(x: Tensor, num_levels: int) -> Tensor:
    """The integer level k of each value of x, which must sit on the grid -1 + 2k / (num_levels - 1)."""
    _check_levels(num_levels)
    scaled = (x.to(torch.float64) + 1) * (num_levels - 1) / 2
    k = scaled.round()
    if (k < 0).any() or (k > num_levels - 1).any() or ((scaled - k).abs() > 1e-3).any():
        raise ValueError(f"data must be quantised to {num_levels} levels in [-1, 1] (k / {(num_levels - 1) / 2:g} - 1); "
                         f"quantise it, pass its num_levels, or use decoder='gaussian' for continuous data")
    return k.long()


def _level_values(k: Tensor, num_levels: int) -> Tensor:
    return (2 * k).to(torch.float64) / (num_levels - 1) - 1  # division last, so the top level is exactly 1


def dequantize(images: Tensor, num_levels: int = 256, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantisation: each pixel moved uniformly inside its bin, level +- 1 / (num_levels - 1)
    (float64). A continuous density on the result bounds the discrete NLL; see the module notes."""
    images = _check_batch(images, "images")
    levels = _level_values(_level_indices(images, num_levels), num_levels)
    u = torch.rand(images.shape, generator=generator, dtype=torch.float64,
                   device=generator.device if generator is not None else images.device).to(images.device)
    return levels + (2 * u - 1) / (num_levels - 1)


def continuous_to_bits_per_dim(nll: Tensor, num_dims: int, num_levels: int = 256) -> Tensor:
    """Bits/dim of binned data from a continuous NLL (nats) of dequantised data: the bins have width
    2 / (num_levels - 1), so -log P(bin) ~ nll + D log((num_levels - 1) / 2)."""
    _check_levels(num_levels)
    return (nll / num_dims + math.log((num_levels - 1) / 2)) / math.log(2)


# ---------------------------------------------------------------------------------------------
# Gaussians
# ---------------------------------------------------------------------------------------------


def _log_normal_mass(a: Tensor, b: Tensor) -> Tensor:
    """log(Phi(b) - Phi(a)) for a < b, accurate in both tails: an interval on the right is reflected
    to the left, where log_ndtr keeps its digits, and the difference is taken as log1p."""
    flip = a > 0
    a, b = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_a, log_b = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    return log_b + torch.log(-torch.expm1(log_a - log_b))


def discretized_gaussian_log_prob(levels: Tensor, mean: Tensor, std: Tensor, num_levels: int = 256) -> Tensor:
    """log P(bin of level k) under N(mean, std^2), elementwise (Ho et al. 2020, eq. 13).

    `levels` holds the integer levels k in [0, num_levels - 1]; the bin of k is its value
    +- 1 / (num_levels - 1), and the outer bins reach -inf and +inf so the probabilities sum to 1."""
    half = 1 / (num_levels - 1)
    centre = _level_values(levels, num_levels)
    mean, std = mean.to(torch.float64), torch.as_tensor(std, dtype=torch.float64, device=mean.device)
    inf = torch.tensor(math.inf, dtype=torch.float64, device=mean.device)
    lower = torch.where(levels == 0, -inf, (centre - half - mean) / std)
    upper = torch.where(levels == num_levels - 1, inf, (centre + half - mean) / std)
    return _log_normal_mass(lower, upper)


def _gaussian_kl(mean_q: Tensor, var_q: Tensor, mean_p: Tensor, var_p: Tensor) -> Tensor:
    """KL(N(mean_q, var_q) || N(mean_p, var_p)) summed over all but the batch dimension, in nats."""
    kl = 0.5 * (torch.log(var_p / var_q) + var_q / var_p - 1 + (mean_q - mean_p) ** 2 / var_p)
    return kl.flatten(1).sum(1)


# ---------------------------------------------------------------------------------------------
# (a) The DDPM variational bound
# ---------------------------------------------------------------------------------------------


def _discrete_schedule(denoiser, schedule: NoiseSchedule | None) -> NoiseSchedule:
    schedule = schedule if schedule is not None else getattr(denoiser, "schedule", None)
    if schedule is None:
        raise ValueError("the variational bound needs the model's discrete schedule: pass schedule=")
    if not schedule.is_discrete:
        raise ValueError(f"the variational bound needs a discrete (DDPM-style) schedule; {schedule.name!r} is "
                         "continuous: use the ODE likelihood instead")
    return schedule


def reverse_variances(schedule: NoiseSchedule, variance: str = "posterior") -> Tensor:
    """The fixed variance of p(x_{t-1} | x_t) for each 0-based step t (float64, [T]); entry 0 is the
    decoder's. `posterior` is DDPM's "fixedsmall", beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t);
    its step-0 value is 0, which DDPM's code replaces by step 1's. `beta` is "fixedlarge", beta_t at
    every step (the paper's sigma_1^2 = beta_1 for the decoder; improved-diffusion swaps in beta~ there)."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; valid: {', '.join(VARIANCES)}")
    abar, betas = schedule.alphas_cumprod, schedule.betas
    if variance == "beta":
        return betas.clone()
    posterior = betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])
    return torch.cat([posterior[:1], posterior])


def prior_kl(schedule: NoiseSchedule, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x0) || N(0, I)) per sample, in nats: with a = abar_T, per dimension
    0.5 (a x0^2 + (1 - a) - 1 - log(1 - a))."""
    a = _discrete_schedule(None, schedule).alphas_cumprod[-1].to(x0.device)
    x0 = x0.to(torch.float64)
    return (0.5 * (a * (x0**2 - 1) - torch.log1p(-a))).flatten(1).sum(1)


@dataclass
class VLB:
    """The bound for each sample (nats) and its parts. `nll = prior + decoder + KL sum`, where the KL
    sum is exact (all steps 1..T-1, one noise draw each) or (T - 1) times the mean of `kl` over
    uniformly drawn steps. `stderr` is that estimate's standard error (it covers both the step and
    the noise draw); it is 0 for the full sum, whose per-step noise is not counted."""

    nll: Tensor  # [B]
    stderr: Tensor  # [B]
    prior: Tensor  # [B] L_T
    decoder: Tensor  # [B] L_0 = -log p(x0 | x_1)
    kl: Tensor  # [B, K] the KL terms evaluated
    timesteps: Tensor  # [B, K] their 0-based steps
    num_dims: int

    @property
    def bits_per_dim(self) -> Tensor:
        """nll / (D log 2). With the discretised decoder these are bits of the quantised data; with
        the Gaussian one, of a continuous density (and may be negative)."""
        return self.nll / (self.num_dims * math.log(2))

    @property
    def bits_per_dim_stderr(self) -> Tensor:
        return self.stderr / (self.num_dims * math.log(2))


def _randn(shape, generator, device) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, dtype=torch.float64, device=gen_device).to(device)


def _x0_estimate(denoiser, x0: Tensor, t: Tensor, schedule: NoiseSchedule, noise: Tensor, dtype, cond: dict):
    """The denoiser's x0_hat (float64) at x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise for steps t [B],
    seen in sigma space as x = x0 + sigma_t noise = x_t / sqrt(abar_t), in the data's own dtype."""
    sigma = schedule.sigmas.to(x0.device)[t]
    x = x0 + per_sample(sigma, x0) * noise
    x0_hat = denoiser(x.to(dtype), sigma.to(dtype), **cond).to(torch.float64)
    if x0_hat.shape != x0.shape:
        raise ValueError(f"the denoiser returned shape {tuple(x0_hat.shape)} for input {tuple(x0.shape)}")
    return x0_hat


@torch.no_grad()
def vlb(
    denoiser,
    x0: Tensor,
    schedule: NoiseSchedule | None = None,
    *,
    variance: str = "posterior",
    decoder: str = "discretized",
    num_levels: int = 256,
    num_timesteps: int | None = None,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> VLB:
    """The DDPM variational bound on -log p(x0) per sample, in nats (Ho et al. 2020, eq. 5):

        L = KL(q(x_T | x0) || N(0, I)) + sum_{t=2..T} E KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))
            + E[-log p(x0 | x_1)]

    (textbook steps; 0-based step t here is textbook t + 1). The model mean is the posterior mean
    with x0_hat = D(x_t / sqrt(abar_t), sigma_t) in place of x0, so any discrete-schedule denoiser
    works, whatever its network predicts. Wrap it in `ClampedDenoiser` to match DDPM's
    `clip_denoised`. The reverse variances are `reverse_variances(schedule, variance)`.

    `decoder`: `discretized` (eq. 13; x0 must be quantised to `num_levels` levels in [-1, 1]) or
    `gaussian` (the density N(x0; x0_hat, var), for continuous data). `num_timesteps=None` sums all
    T - 1 KL terms (T denoiser calls); an integer K draws K steps per sample uniformly from 1..T-1
    (with replacement; K + 1 calls) and scales their mean by T - 1: unbiased, with a standard error.
    The prior and decoder terms are always exact: the decoder term is by far the largest single term,
    and sampling it would swamp the estimate. Even so, uniform steps are a noisy estimator, because
    the few steps nearest the data carry most of the sum (1-D oracle data, K = 40: a standard error
    of about 6 nats on a bound of 1.4). `cond` goes to the denoiser; noise and steps come from
    `generator`.

    Which variance: for data that is smooth at the scale of sigma_1 (continuous data, or pixels whose
    density varies slowly across a bin) the true reverse variance near the data is about beta_t, so
    `beta` gives the tighter bound. With the exact oracle model and T = 1000, `beta` came within 0.5 %
    of the true NLL and `posterior` 0.4-0.55 nats per dimension above it.
    """
    schedule = _discrete_schedule(denoiser, schedule)
    x0 = _check_batch(x0, "x0")
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; valid: {', '.join(DECODERS)}")
    if num_timesteps is not None and (not isinstance(num_timesteps, int) or isinstance(num_timesteps, bool)
                                      or num_timesteps < 2):
        raise ValueError(f"num_timesteps must be None (all steps) or an integer >= 2, got {num_timesteps!r}")
    var_p = reverse_variances(schedule, variance).to(x0.device)
    cond = cond or {}
    dtype, device = x0.dtype, x0.device
    batch, num_steps, num_dims = x0.shape[0], schedule.num_steps, x0[0].numel()
    if decoder == "discretized":
        levels = _level_indices(x0, num_levels)
        x0 = _level_values(levels, num_levels)
    else:
        x0 = x0.to(torch.float64)

    prior = prior_kl(schedule, x0)

    # L_0: at step 0 the model mean is x0_hat itself (the posterior mean's weights are 1 and 0 there).
    t0 = torch.zeros(batch, dtype=torch.long, device=device)
    x0_hat = _x0_estimate(denoiser, x0, t0, schedule, _randn(x0.shape, generator, device), dtype, cond)
    if decoder == "discretized":
        decoder_nll = -discretized_gaussian_log_prob(levels, x0_hat, var_p[0].sqrt(), num_levels).flatten(1).sum(1)
    else:
        decoder_nll = 0.5 * ((x0 - x0_hat) ** 2 / var_p[0] + torch.log(2 * math.pi * var_p[0])).flatten(1).sum(1)

    if num_timesteps is None:
        steps = torch.arange(1, num_steps, device=device).expand(batch, num_steps - 1)
    else:
        gen_device = generator.device if generator is not None else device
        steps = torch.randint(1, num_steps, (batch, num_timesteps), generator=generator, device=gen_device).to(device)
    # The posterior mean is linear in (x0, x_t), and the model's differs only in x0 -> x0_hat, so the
    # mean gap is (weight on x0) * (x0 - x0_hat): the mean at (x0 = 1, x_t = 0) gives that weight.
    ones = torch.ones(num_steps, 1, dtype=torch.float64, device=device)
    x0_weight, var_q = (v[:, 0] for v in q_posterior(schedule, ones, torch.zeros_like(ones),
                                                     torch.arange(num_steps, device=device)))
    kl = torch.empty(steps.shape, dtype=torch.float64, device=device)
    for j in trange(steps.shape[1], disable=not progress, desc="vlb", unit="step"):
        t = steps[:, j]
        x0_hat = _x0_estimate(denoiser, x0, t, schedule, _randn(x0.shape, generator, device), dtype, cond)
        gap = per_sample(x0_weight[t], x0) * (x0 - x0_hat)
        kl[:, j] = _gaussian_kl(gap, per_sample(var_q[t], x0), torch.zeros_like(gap), per_sample(var_p[t], x0))

    if num_timesteps is None:
        kl_sum, stderr = kl.sum(1), torch.zeros_like(prior)
    else:
        kl_sum = (num_steps - 1) * kl.mean(1)
        stderr = (num_steps - 1) * kl.std(1) / math.sqrt(num_timesteps)
    return VLB(prior + decoder_nll + kl_sum, stderr, prior, decoder_nll, kl, steps, num_dims)


# ---------------------------------------------------------------------------------------------
# (b) The probability-flow ODE
# ---------------------------------------------------------------------------------------------


@dataclass
class ODELikelihood:
    """log p(x) per sample, in nats, from the probability-flow ODE. `log_prob = prior_log_prob +
    mean(divergence over probes)`; `stderr` is the standard error across probes (0 for the exact
    trace). It is the density of the data blurred by N(0, sigma_min^2): see `ode_log_likelihood`."""

    log_prob: Tensor  # [B]
    stderr: Tensor  # [B]
    prior_log_prob: Tensor  # [B] log N(x(sigma_max); 0, prior_std^2 I)
    divergence: Tensor  # [B, P] the divergence integral, one column per probe (P = 1 for the exact trace)
    x_end: Tensor  # x(sigma_max), float64
    nfe: int  # denoiser evaluations (each with its backward passes)
    num_dims: int


def _sigma_range(schedule, sigma_min, sigma_max) -> tuple[float, float]:
    if sigma_min is None or sigma_max is None:
        if schedule is None:
            raise ValueError("give sigma_min and sigma_max, or a schedule (schedule= or the denoiser's own)")
        sigma_min = schedule.sigma_min if sigma_min is None else sigma_min
        sigma_max = schedule.sigma_max if sigma_max is None else sigma_max
    if not (0 < sigma_min < sigma_max < math.inf):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return float(sigma_min), float(sigma_max)


def _probes(kind: str, num: int, shape, generator, device) -> Tensor:
    gen_device = generator.device if generator is not None else device
    if kind == "rademacher":
        v = torch.randint(0, 2, (num, *shape), generator=generator, device=gen_device).to(torch.float64) * 2 - 1
    else:
        v = torch.randn((num, *shape), generator=generator, dtype=torch.float64, device=gen_device)
    return v.to(device)


def ode_log_likelihood(
    denoiser,
    x: Tensor,
    *,
    schedule: NoiseSchedule | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    prior_std: float | None = None,
    trace: str = "auto",
    num_probes: int = 4,
    probe: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
) -> ODELikelihood:
    """log p(x) by the probability-flow ODE (Song et al. 2021, appendix D.2), in nats per sample.

    The flow is solved in sigma space, where every denoiser speaks, with u = log(sigma) as the time:

        dx/du = x - D(x, sigma),      d/du log p_sigma(x(u)) = -div(x - D) = tr(dD/dx) - D_dims,

    so log p_{sigma_min}(x) = log N(x(sigma_max); 0, prior_std^2 I) + int (D_dims - tr dD/dx) du.
    In log sigma the right-hand side is O(1) over the whole range (the time `oracle.ode_solve`
    uses), so an adaptive solver spends its steps evenly per decade of noise. For a VP model this is
    its own ODE in t after the per-sample scaling x = x_t / sqrt(abar_t), and the density comes out
    on the data's scale with no Jacobian to add. The solver is Dormand-Prince 5(4) (`rtol`, `atol`
    on the joint state of x and the integral; Song et al. use 1e-5 with RK45).

    The data end: the integration starts at `sigma_min` with x as the point there, so the result is
    log p_{sigma_min}(x), the model density blurred by N(0, sigma_min^2), not p_0. By the heat
    equation the difference is about sigma_min^2 / 2 (lap log p + |grad log p|^2): negligible for a
    small sigma_min, but a discrete VP model is only trained down to its schedule's sigma_min (0.01
    for the linear one), which is the default. The prior end: `prior_std` defaults to
    sqrt(1 + sigma_max^2) for a discrete (VP) schedule, whose x_T ~ N(0, I) is exactly that in sigma
    space, and to sigma_max otherwise (VE, as Song et al.), wrong by O(data variance / sigma_max^2).

    The divergence: `exact` is one backward pass per dimension; `hutchinson` is v^T (dD/dx) v with
    `num_probes` fixed `probe` vectors (rademacher or gaussian), one backward pass each, all riding
    on the same trajectory; each probe gives an unbiased estimate and `stderr` is their spread /
    sqrt(P). `auto` is exact up to EXACT_TRACE_MAX_DIM dimensions. The denoiser must be
    differentiable in x; its calls run in x's dtype, the solver state in float64.
    """
    x = _check_batch(x, "x")
    schedule = schedule if schedule is not None else getattr(denoiser, "schedule", None)
    sigma_min, sigma_max = _sigma_range(schedule, sigma_min, sigma_max)
    if prior_std is None:
        prior_std = math.sqrt(1 + sigma_max**2) if schedule is not None and schedule.is_discrete else sigma_max
    if not prior_std > 0:
        raise ValueError(f"prior_std must be > 0, got {prior_std}")
    if trace not in TRACES:
        raise ValueError(f"unknown trace {trace!r}; valid: {', '.join(TRACES)}")
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; valid: {', '.join(PROBES)}")
    batch, num_dims, dtype, device = x.shape[0], x[0].numel(), x.dtype, x.device
    if trace == "auto":
        trace = "exact" if num_dims <= EXACT_TRACE_MAX_DIM else "hutchinson"
    if trace == "hutchinson":
        if not isinstance(num_probes, int) or isinstance(num_probes, bool) or num_probes < 2:
            raise ValueError(f"num_probes must be an integer >= 2 (the standard error needs two), got {num_probes!r}")
        probes = _probes(probe, num_probes, (batch, num_dims), generator, device)
    cond = cond or {}
    nfe = 0

    def grad_dot(d: Tensor, xs: Tensor, v: Tensor, last: bool) -> Tensor:
        (g,) = torch.autograd.grad(d, xs, grad_outputs=v.reshape(x.shape).to(dtype), retain_graph=not last,
                                   materialize_grads=True)
        return g.flatten(1).to(torch.float64)

    def rhs(u: float, y: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        xs = y[:, :num_dims].reshape(x.shape).to(dtype).requires_grad_(True)
        sigma = torch.full((batch,), math.exp(u), dtype=dtype, device=device)
        with torch.enable_grad():
            d = denoiser(xs, sigma, **cond)
            if d.shape != x.shape:
                raise ValueError(f"the denoiser returned shape {tuple(d.shape)} for input {tuple(x.shape)}")
            if not d.requires_grad:
                raise ValueError("the denoiser's output does not depend differentiably on x "
                                 "(torch.no_grad or detach inside it?); the ODE likelihood needs autograd through it")
            if trace == "exact":
                eye = torch.zeros(batch, num_dims, dtype=torch.float64, device=device)
                traces = torch.zeros(batch, dtype=torch.float64, device=device)
                for i in range(num_dims):  # row i of the Jacobian: d D_i / dx, summed over the batch
                    eye.zero_()
                    eye[:, i] = 1
                    traces += grad_dot(d, xs, eye, i == num_dims - 1)[:, i]
                traces = traces[:, None]
            else:
                traces = torch.stack([(grad_dot(d, xs, v, p == num_probes - 1) * v).sum(1)
                                      for p, v in enumerate(probes)], 1)
        dx = (xs - d).detach().flatten(1).to(torch.float64)
        return torch.cat([dx, num_dims - traces], 1)

    columns = 1 if trace == "exact" else num_probes
    y0 = torch.cat([x.detach().flatten(1).to(torch.float64),
                    torch.zeros(batch, columns, dtype=torch.float64, device=device)], 1)
    y1 = _dormand_prince(rhs, y0, math.log(sigma_min), math.log(sigma_max), rtol, atol)
    x_end, divergence = y1[:, :num_dims], y1[:, num_dims:]
    prior = -0.5 * (x_end**2).sum(1) / prior_std**2 - 0.5 * num_dims * math.log(2 * math.pi * prior_std**2)
    log_prob = prior + divergence.mean(1)
    if trace == "exact":
        stderr = torch.zeros_like(log_prob)
    else:
        stderr = divergence.std(1) / math.sqrt(columns)
    return ODELikelihood(log_prob, stderr, prior, divergence, x_end.reshape(x.shape), nfe, num_dims)


# ---------------------------------------------------------------------------------------------
# (c) Bits per dimension of images
# ---------------------------------------------------------------------------------------------


@dataclass
class BitsPerDim:
    """Bits/dim per image, their Monte Carlo standard error, and the underlying result."""

    bpd: Tensor  # [B]
    stderr: Tensor  # [B]
    details: VLB | ODELikelihood


def bits_per_dim(
    model_or_denoiser,
    images: Tensor,
    method: str = "vlb",
    *,
    num_levels: int = 256,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    **options,
) -> BitsPerDim:
    """Bits/dim of quantised images [B, ...] in [-1, 1] (`num_levels` levels; 17 for the sklearn digits).

    `model_or_denoiser`: a checkpoint `Model` (`train.checkpoint.load`; anything with `.denoiser`
    and `.schedule`), or a denoiser (its `.schedule`, or `schedule=` in options).
    `vlb`: the discretised-decoder bound, `vlb(...).bits_per_dim`. `ode`: the flow's density on
    uniformly dequantised images, converted as in the module notes. `options` go to `vlb` or
    `ode_log_likelihood` (schedule, variance, num_timesteps, trace, num_probes, rtol, ...).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    denoiser = model_or_denoiser
    images = _check_batch(images, "images")
    if not callable(denoiser):
        if not hasattr(denoiser, "denoiser"):
            raise ValueError("model_or_denoiser must be a denoiser D(x, sigma) or a model with .denoiser and .schedule")
        shape = tuple(getattr(denoiser, "image_shape", images.shape[1:]))
        if tuple(images.shape[1:]) != shape:
            raise ValueError(f"images must have shape [B, {', '.join(map(str, shape))}] for this model, "
                             f"got {tuple(images.shape)}")
        options.setdefault("schedule", denoiser.schedule)
        denoiser = denoiser.denoiser
    if method == "vlb":
        result = vlb(denoiser, images, num_levels=num_levels, cond=cond, generator=generator, **options)
        return BitsPerDim(result.bits_per_dim, result.bits_per_dim_stderr, result)
    x = dequantize(images, num_levels, generator).to(images.dtype)
    result = ode_log_likelihood(denoiser, x, cond=cond, generator=generator, **options)
    bpd = continuous_to_bits_per_dim(-result.log_prob, result.num_dims, num_levels)
    return BitsPerDim(bpd, result.stderr / (result.num_dims * math.log(2)), result)


__all__ = [
    "BitsPerDim",
    "ODELikelihood",
    "VLB",
    "bits_per_dim",
    "continuous_to_bits_per_dim",
    "dequantize",
    "discretized_gaussian_log_prob",
    "ode_log_likelihood",
    "prior_kl",
    "reverse_variances",
    "vlb",
]
