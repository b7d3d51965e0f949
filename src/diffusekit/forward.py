"""The forward (noising) process, its posterior, and the training loss.

Discrete-time functions use 0-based step indices: index t is the textbook step t + 1, so
`x_t` has `abar = schedule.alphas_cumprod[t]` and the clean image is "step -1".
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._utils import per_sample
from .schedules import NoiseSchedule


def _alphas_cumprod(schedule: NoiseSchedule) -> Tensor:
    if not schedule.is_discrete:
        raise ValueError(f"the discrete forward process needs a discrete schedule; {schedule.name!r} is continuous")
    return schedule.alphas_cumprod


def _index(schedule: NoiseSchedule, values: Tensor, t, like: Tensor) -> Tensor:
    t = torch.as_tensor(t, device=values.device).long()
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    if t.shape != (like.shape[0],):
        raise ValueError(f"t must be a scalar or have shape [{like.shape[0]}], got {tuple(t.shape)}")
    if (t < 0).any() or (t >= schedule.num_steps).any():
        raise ValueError(f"t must lie in [0, {schedule.num_steps - 1}]")
    return per_sample(values[t], like)


def q_sample(schedule: NoiseSchedule, x0: Tensor, t, noise: Tensor) -> Tensor:
    """Closed form q(x_t | x0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (DDPM eq. 4)."""
    abar = _index(schedule, _alphas_cumprod(schedule), t, x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def q_step(schedule: NoiseSchedule, x_prev: Tensor, t, noise: Tensor) -> Tensor:
    """One textbook step q(x_t | x_{t-1}): sqrt(alpha_t) x_{t-1} + sqrt(1 - alpha_t) noise (DDPM eq. 2).
    For t = 0, x_prev is the clean image."""
    _alphas_cumprod(schedule)
    alpha = _index(schedule, schedule.alphas, t, x_prev)
    return alpha.sqrt() * x_prev + (1 - alpha).sqrt() * noise


def q_posterior(schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t) -> tuple[Tensor, Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x0) (DDPM eqs. 6-7). At t = 0 the posterior is the
    point mass at x0 (mean x0, variance 0)."""
    abar = _alphas_cumprod(schedule)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    beta = _index(schedule, schedule.betas, t, x0)
    a_t = _index(schedule, abar, t, x0)
    a_prev = _index(schedule, abar_prev, t, x0)
    alpha = 1 - beta
    mean = (beta * a_prev.sqrt() / (1 - a_t)) * x0 + ((1 - a_prev) * alpha.sqrt() / (1 - a_t)) * x_t
    variance = (1 - a_prev) / (1 - a_t) * beta
    return mean, variance.expand_as(x0)


# ---------------------------------------------------------------------------------------------
# Training targets and the loss
# ---------------------------------------------------------------------------------------------

WEIGHTINGS = ("uniform", "min_snr")


def training_target(denoiser, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """What the network should output at x = x0 + sigma * noise: the F that makes
    `c_skip x + c_out F = x0`. That is eps for eps-prediction, v = sqrt(abar) eps - sqrt(1 - abar) x0
    for v-prediction, x0 for x0-prediction and EDM's F for `edm`."""
    c_skip, c_out, _, _ = denoiser.precondition(sigma)
    x = x0 + per_sample(sigma, x0) * noise
    return (x0 - per_sample(c_skip, x0) * x) / per_sample(c_out, x0)


def loss_weight(denoiser, sigma: Tensor, weighting: str = "uniform", min_snr_gamma: float = 5.0,
                snr_floor: float = 0.0) -> Tensor:
    """Per-sample weight on the squared error of the network output.

    `uniform` weights the network's own output equally (DDPM's L_simple for eps-prediction; EDM's
    weighting under EDM preconditioning). `min_snr` (Hang et al. 2023) caps the x0-space weight at
    min(SNR, gamma); in output space that is min(SNR, gamma) * c_out^2, i.e. min(SNR, gamma) / SNR
    for eps, min(SNR, gamma) / (SNR + 1) for v and min(SNR, gamma) for x0. `snr_floor` also keeps
    that x0-space weight from falling below the floor: clamp(SNR, floor, gamma). Plain min-SNR's
    weight goes to 0 at high noise, where an image's layout is decided, so a text-to-image model
    learns late where to put things (benchmarks/RESULTS.md, issue 6: floor 0.1 took shapes placed
    as asked from 50% to 94% at equal time)."""
    if weighting == "uniform":
        return torch.ones_like(sigma)
    if weighting == "min_snr":
        if not 0 <= snr_floor <= min_snr_gamma:
            raise ValueError(f"snr_floor must lie in [0, min_snr_gamma={min_snr_gamma}], got {snr_floor}")
        _, c_out, _, _ = denoiser.precondition(sigma)
        snr = sigma.to(torch.float64) ** -2
        return (snr.clamp(min=snr_floor, max=min_snr_gamma) * c_out.to(torch.float64) ** 2).to(sigma.dtype)
    raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")


def sample_training_sigmas(denoiser, batch: int, *, generator=None, device=None, p_mean=-1.2, p_std=1.2) -> Tensor:
    """Noise levels to train at. Discrete schedules draw the timestep uniformly from
    {0, ..., T-1} (DDPM); continuous ones draw log sigma ~ N(p_mean, p_std^2) (EDM)."""
    schedule = denoiser.schedule
    if schedule is not None and schedule.is_discrete:
        t = torch.randint(0, schedule.num_steps, (batch,), generator=generator)
        return schedule.sigmas[t].to(device)
    log_sigma = torch.randn(batch, generator=generator, dtype=torch.float64) * p_std + p_mean
    return log_sigma.exp().to(device)


def loss(
    denoiser,
    x0: Tensor,
    *,
    weighting: str = "uniform",
    min_snr_gamma: float = 5.0,
    snr_floor: float = 0.0,
    generator: torch.Generator | None = None,
    sigma: Tensor | None = None,
    noise: Tensor | None = None,
    **cond,
) -> Tensor:
    """The diffusion training loss for one batch: at noise level `sigma` with `noise` (drawn from
    `generator` on the CPU when not given, so a seed reproduces the loss), run the network and
    return the weighted mean squared error against `training_target`."""
    if sigma is None:
        sigma = sample_training_sigmas(denoiser, x0.shape[0], generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    sigma, noise = sigma.to(x0.device), noise.to(device=x0.device, dtype=x0.dtype)
    x = x0 + per_sample(sigma, x0) * noise
    output = denoiser.network_output(x, sigma, **cond)
    target = training_target(denoiser, x0, noise, sigma)
    weight = loss_weight(denoiser, sigma, weighting, min_snr_gamma, snr_floor).float()
    squared_error = ((output.float() - target.float()) ** 2).flatten(1).mean(1)
    return (weight * squared_error).mean()
