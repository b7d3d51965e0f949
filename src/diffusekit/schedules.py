"""Noise schedules, the `abar <-> sigma` conversions, and the sigma sequences samplers walk.

Everything a sampler sees lives in sigma space, `x = x0 + sigma * eps` (the k-diffusion / EDM
convention). A variance-preserving model's `x_t = sqrt(abar) x0 + sqrt(1 - abar) eps` is the same
point as `x_t / sqrt(abar)` with `sigma = sqrt((1 - abar) / abar)`. This module is the only place
that converts between the two views.

A schedule is data: a `NoiseSchedule` holds tensors (or a sigma range) and pure functions of them.
There is no step counter and no mutable state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch
from torch import Tensor

# Zero-terminal-SNR schedules have abar_T = 0, i.e. sigma_T = inf, which no solver can start from.
# Like diffusers' Euler scheduler we read such a terminal step as abar = 2**-24 (sigma = 4096), or
# as half the previous step's abar where that is smaller, so sigmas keep increasing with t.
MIN_ALPHA_CUMPROD = 2.0**-24


def _vp_sigmas(alphas_cumprod: Tensor) -> Tensor:
    positive = alphas_cumprod[alphas_cumprod > 0]
    floor = min(MIN_ALPHA_CUMPROD, float(positive.min()) / 2)
    return abar_to_sigma(torch.where(alphas_cumprod > 0, alphas_cumprod, floor))


# ---------------------------------------------------------------------------------------------
# Conversions (elementwise; accept tensors or floats)
# ---------------------------------------------------------------------------------------------


def abar_to_sigma(abar):
    """sigma = sqrt((1 - abar) / abar)."""
    if isinstance(abar, Tensor):
        return ((1 - abar) / abar).sqrt()
    return math.sqrt((1 - abar) / abar)


def sigma_to_abar(sigma):
    """abar = 1 / (1 + sigma^2)."""
    return 1 / (1 + sigma**2)


def log_snr(sigma):
    """log(SNR) = log(abar / (1 - abar)) = -2 log(sigma)."""
    if isinstance(sigma, Tensor):
        return -2 * sigma.log()
    return -2 * math.log(sigma)


# ---------------------------------------------------------------------------------------------
# Beta schedules for discrete variance-preserving models (float64)
# ---------------------------------------------------------------------------------------------


def _linear_betas(num_steps: int, beta_start: float, beta_end: float) -> Tensor:
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def _scaled_linear_betas(num_steps: int, beta_start: float, beta_end: float) -> Tensor:
    # Stable Diffusion / LDM: linear in sqrt(beta).
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2


def _cosine_betas(num_steps: int, beta_start: float, beta_end: float, max_beta: float = 0.999) -> Tensor:
    # Nichol & Dhariwal 2021, eq. 17, with s = 0.008; betas clipped at 0.999 so the last step is
    # not a pure-noise singularity. beta_start/beta_end do not apply.
    def abar(t: Tensor) -> Tensor:
        return torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    return (1 - abar(t[1:]) / abar(t[:-1])).clamp(max=max_beta)


def _sigmoid_betas(num_steps: int, beta_start: float, beta_end: float) -> Tensor:
    # GeoDiff's sigmoid schedule, as diffusers defines it.
    ramp = torch.linspace(-6, 6, num_steps, dtype=torch.float64)
    return torch.sigmoid(ramp) * (beta_end - beta_start) + beta_start


# name -> (betas function, default beta_start, default beta_end)
BETA_SCHEDULES: dict[str, tuple[Callable[..., Tensor], float, float]] = {
    "linear": (_linear_betas, 1e-4, 0.02),
    "scaled_linear": (_scaled_linear_betas, 0.00085, 0.012),
    "cosine": (_cosine_betas, 0.0, 0.0),
    "sigmoid": (_sigmoid_betas, 1e-4, 0.02),
}
CONTINUOUS_SCHEDULES = {"edm": (0.002, 80.0)}
SCHEDULE_NAMES = tuple(BETA_SCHEDULES) + tuple(CONTINUOUS_SCHEDULES)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar) so the last step has SNR 0 while
    the first keeps its value."""
    sqrt_abar = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


# ---------------------------------------------------------------------------------------------
# Sigma sequences: pure functions returning descending float64 tensors that end in 0
# ---------------------------------------------------------------------------------------------


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: uniform steps in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Uniform steps in log sigma (i.e. in log-SNR)."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())


def polyexponential_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> Tensor:
    """k-diffusion's polyexponential: log sigma from log sigma_max to log sigma_min along the ramp
    (1 - i / (n - 1))^rho (rho = 1 is `exponential`; larger rho spends more steps at low noise)."""
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    return _append_zero((ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)).exp())


def vp_sigmas(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> Tensor:
    """The continuous VP (DDPM) schedule of Song et al. 2021, as in EDM and k-diffusion: t evenly from
    1 to eps_s, sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1). Its range is its own (sigma
    from about 152 down to 0.01 with the defaults), not the schedule's."""
    t = torch.linspace(1, eps_s, n, dtype=torch.float64)
    return _append_zero(torch.sqrt(torch.expm1(beta_d * t**2 / 2 + beta_min * t)))


def discrete_timesteps(num_train_steps: int, n: int, spacing: str, steps_offset: int = 0) -> Tensor:
    """Integer timesteps (descending) as diffusers' `timestep_spacing` picks them (Lin et al. 2023,
    Table 2): `leading` (t = k * (T // n) + offset), `trailing` (counted down from T - 1) and
    `linspace` (evenly from T - 1 to 0, rounded)."""
    if spacing == "leading":
        ratio = num_train_steps // n
        steps = torch.arange(n, dtype=torch.float64) * ratio + steps_offset
    elif spacing == "trailing":
        ratio = num_train_steps / n
        steps = torch.arange(num_train_steps, 0, -ratio, dtype=torch.float64).round() - 1
        steps = steps.flip(0)
    elif spacing == "linspace":
        steps = torch.linspace(0, num_train_steps - 1, n, dtype=torch.float64).round()
    else:
        raise ValueError(f"unknown discrete spacing {spacing!r}; valid: leading, trailing, linspace")
    steps = steps.long().flip(0)
    if steps.max() >= num_train_steps or steps.min() < 0:
        raise ValueError(
            f"steps_offset={steps_offset} puts timesteps outside [0, {num_train_steps - 1}]; lower it"
        )
    return steps


# ---------------------------------------------------------------------------------------------
# The schedule
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A noise schedule as data.

    Discrete variance-preserving schedules (DDPM, Stable Diffusion) hold `alphas_cumprod`
    (float64, [T]; index t is the textbook step t + 1). Continuous schedules (EDM) hold only a
    sigma range. Build them with `from_name`, `from_betas` or `continuous`.
    """

    name: str
    sigma_min: float
    sigma_max: float
    alphas_cumprod: Tensor | None = None

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_name(
        cls,
        name: str,
        num_steps: int = 1000,
        *,
        beta_start: float | None = None,
        beta_end: float | None = None,
        zero_terminal_snr: bool = False,
    ) -> "NoiseSchedule":
        """`linear`, `scaled_linear`, `cosine`, `sigmoid` (discrete, T = num_steps) or `edm`."""
        if name in CONTINUOUS_SCHEDULES:
            return cls.continuous(*CONTINUOUS_SCHEDULES[name], name=name)
        if name not in BETA_SCHEDULES:
            raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULE_NAMES)}")
        if not isinstance(num_steps, int) or num_steps < 2:
            raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")
        fn, default_start, default_end = BETA_SCHEDULES[name]
        beta_start = default_start if beta_start is None else beta_start
        beta_end = default_end if beta_end is None else beta_end
        if name != "cosine":
            for arg, value in (("beta_start", beta_start), ("beta_end", beta_end)):
                if not 0 < value < 1:
                    raise ValueError(f"{arg} must lie in (0, 1), got {value}")
        betas = fn(num_steps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
            name = f"{name}+zero_terminal_snr"
        return cls.from_betas(betas, name=name)

    @classmethod
    def from_betas(cls, betas, *, name: str = "custom") -> "NoiseSchedule":
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 2:
            raise ValueError(f"betas must hold at least 2 steps (T >= 2), got {betas.numel()}")
        # beta = 1 is allowed only as the final step of a zero-terminal-SNR schedule.
        inner_ok = ((betas[:-1] > 0) & (betas[:-1] < 1)).all()
        last_ok = 0 < betas[-1] <= 1
        if not (inner_ok and last_ok) or not torch.isfinite(betas).all():
            raise ValueError("betas must lie in (0, 1) (only the last may be 1, for zero terminal SNR)")
        abar = torch.cumprod(1 - betas, 0)
        sigmas = _vp_sigmas(abar)
        return cls(name, float(sigmas[0]), float(sigmas[-1]), abar)

    @classmethod
    def continuous(cls, sigma_min: float = 0.002, sigma_max: float = 80.0, *, name: str = "edm") -> "NoiseSchedule":
        """A continuous sigma range (EDM, variance-exploding models)."""
        if not 0 < sigma_min < sigma_max < math.inf:
            raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        return cls(name, float(sigma_min), float(sigma_max), None)

    # -- views ---------------------------------------------------------------------------------

    @property
    def is_discrete(self) -> bool:
        return self.alphas_cumprod is not None

    def _require_discrete(self, what: str) -> Tensor:
        if self.alphas_cumprod is None:
            raise ValueError(f"{what} needs a discrete schedule; {self.name!r} is continuous")
        return self.alphas_cumprod

    @property
    def num_steps(self) -> int:
        return len(self._require_discrete("num_steps"))

    @property
    def betas(self) -> Tensor:
        abar = self._require_discrete("betas")
        return 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])

    @property
    def alphas(self) -> Tensor:
        return 1 - self.betas

    @cached_property  # a pure function of the frozen table; sigma_to_t reads it on every denoiser call
    def sigmas(self) -> Tensor:
        """sigma_t for t = 0 .. T-1 (ascending; a zero terminal abar is read as 2**-24, see above)."""
        return _vp_sigmas(self._require_discrete("sigmas"))

    @cached_property
    def _log_sigmas(self) -> Tensor:
        return self.sigmas.log()

    @property
    def log_snr(self) -> Tensor:
        return log_snr(self.sigmas)

    # -- t <-> sigma ---------------------------------------------------------------------------

    def sigma_to_t(self, sigma: Tensor, mode: str = "interp") -> Tensor:
        """Fractional timestep for each sigma: linear interpolation in log sigma between the two
        neighbouring steps (`interp`, k-diffusion's convention) or the nearest step (`nearest`).
        Sigmas outside the table clamp to t = 0 or T - 1."""
        sigma = torch.as_tensor(sigma)
        log_sigmas = self._log_sigmas.to(sigma.device)
        log_sigma = sigma.to(torch.float64).clamp(min=1e-300).log()
        if mode == "nearest":
            return (log_sigma[..., None] - log_sigmas).abs().argmin(-1).to(torch.float64)
        if mode != "interp":
            raise ValueError(f"unknown timestep mode {mode!r}; valid: interp, nearest")
        high = torch.searchsorted(log_sigmas, log_sigma.contiguous()).clamp(1, len(log_sigmas) - 1)
        low = high - 1
        w = ((log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])).clamp(0, 1)
        return low + w

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma at a (fractional) timestep, interpolating log sigma between integer steps."""
        t = torch.as_tensor(t, dtype=torch.float64)
        log_sigmas = self._log_sigmas.to(t.device)
        t = t.clamp(0, len(log_sigmas) - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()

    # -- sigma sequences -----------------------------------------------------------------------

    def get_sigmas(
        self,
        n: int,
        spacing: str = "karras",
        *,
        rho: float | None = None,
        steps_offset: int = 0,
        set_alpha_to_one: bool = True,
        beta_d: float = 19.9,
        beta_min: float = 0.1,
        eps_s: float = 1e-3,
        denoiser=None,
        sample_shape=None,
        solver: str = "unipc",
        solver_options: dict | None = None,
        seed: int = 0,
        calibration=None,
        info: dict | None = None,
    ) -> Tensor:
        """n noise levels, descending, followed by 0 (so n solver steps), float64.

        Spacings: `karras` (rho, default 7), `exponential`, `polyexponential` (rho, default 1),
        `vp` (the continuous VP schedule with beta_d, beta_min, eps_s; it ignores this schedule's
        sigma range), `uniform` (evenly in t for discrete schedules, evenly in sigma for continuous
        ones), and for discrete schedules diffusers' `leading` (with `steps_offset`), `trailing` and
        `linspace`. With `set_alpha_to_one=False` (diffusers' DDIM option, used by Stable Diffusion)
        the discrete sequences end at sigma(t = 0) before the final 0, so a sampler's last step
        denoises from that level.

        `optimised` is computed from the model for one solver (`diffusekit.schedule_opt`: the
        solver's endpoint error against the model's own fine-step ODE solutions from calibration
        noise, minimised over the levels). It needs `denoiser=` and `sample_shape=` (one sample's
        shape) and takes `solver` / `solver_options` (a deterministic sampler and its options, e.g.
        "unipc" with {"order": 3}), `seed` (of the calibration noise), `calibration` (a
        `schedule_opt.Calibration`: the model-evaluation budget) and `info` (a dict that receives
        the evaluations used). Use it with the solver it was made for; it starts at sigma_max and
        stays inside [sigma_min, sigma_max].
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n (number of steps) must be a positive integer, got {n!r}")
        if spacing not in ALL_SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; valid: {', '.join(ALL_SPACINGS)}")
        if spacing == "optimised":
            from .schedule_opt import optimised_sigmas

            return optimised_sigmas(denoiser, n, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                                    sample_shape=sample_shape, variance_preserving=self.is_discrete, solver=solver,
                                    solver_options=solver_options, seed=seed, calibration=calibration,
                                    schedule=self, info=info)
        if spacing == "karras":
            return karras_sigmas(n, self.sigma_min, self.sigma_max, 7.0 if rho is None else rho)
        if spacing == "exponential":
            return exponential_sigmas(n, self.sigma_min, self.sigma_max)
        if spacing == "polyexponential":
            return polyexponential_sigmas(n, self.sigma_min, self.sigma_max, 1.0 if rho is None else rho)
        if spacing == "vp":
            if not (beta_d > 0 and beta_min >= 0 and 0 < eps_s < 1):
                raise ValueError(f"vp spacing needs beta_d > 0, beta_min >= 0, 0 < eps_s < 1; got {beta_d}, {beta_min}, {eps_s}")
            return vp_sigmas(n, beta_d, beta_min, eps_s)
        if spacing == "uniform":
            if self.is_discrete:
                t = torch.linspace(self.num_steps - 1, 0, n, dtype=torch.float64)
                return _append_zero(self.t_to_sigma(t))
            return _append_zero(torch.linspace(self.sigma_max, self.sigma_min, n, dtype=torch.float64))
        # leading / trailing / linspace
        self._require_discrete(f"spacing {spacing!r}")
        if n > self.num_steps:
            raise ValueError(f"n={n} exceeds the schedule's {self.num_steps} training steps")
        sigmas = self.sigmas[discrete_timesteps(self.num_steps, n, spacing, steps_offset)]
        if not set_alpha_to_one:
            sigmas = torch.cat([sigmas, self.sigmas[:1]])
        return _append_zero(sigmas)

    def __repr__(self) -> str:
        kind = f"T={self.num_steps}" if self.is_discrete else "continuous"
        return f"NoiseSchedule({self.name!r}, {kind}, sigma_min={self.sigma_min:.4g}, sigma_max={self.sigma_max:.4g})"


SPACINGS = ("karras", "exponential", "polyexponential", "vp", "uniform", "leading", "trailing", "linspace")
# Spacings computed from the model itself (they need `denoiser=`; see `schedule_opt`).
OPTIMISED_SPACINGS = ("optimised",)
ALL_SPACINGS = SPACINGS + OPTIMISED_SPACINGS
