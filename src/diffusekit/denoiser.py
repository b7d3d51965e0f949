"""`D(x, sigma, **cond) -> x0_hat` around any network, in sigma space.

Every parameterisation is one line of EDM's preconditioning (Karras et al. 2022, Table 1):

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))

| prediction | c_skip                     | c_out                             | network predicts |
| eps        | 1                          | -sigma                            | the noise        |
| x0         | 0                          | 1                                 | the clean sample |
| v          | sd^2 / (sigma^2 + sd^2)    | -sigma sd / sqrt(sigma^2 + sd^2)  | v = alpha eps - sigma_vp x0 |
| edm        | sd^2 / (sigma^2 + sd^2)    | +sigma sd / sqrt(sigma^2 + sd^2)  | EDM's F (= -v)   |

with c_in = 1 / sqrt(sigma^2 + sd^2) (sd = sigma_data). For a discrete variance-preserving model
sd = 1, so c_in x = sqrt(abar) x is exactly the x_t the network was trained on, and c_noise is the
(fractional) timestep; for a continuous model c_noise = log(sigma) / 4.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._utils import per_sample
from .schedules import NoiseSchedule

PREDICTIONS = ("eps", "x0", "v", "edm")


class Denoiser(nn.Module):
    """Wraps `network(x_in, c_noise, **cond)` as `D(x, sigma, **cond)`.

    `schedule`: a discrete `NoiseSchedule` for timestep-conditioned VP models (sigma -> t by
    log-sigma interpolation, or nearest step with `timestep_mode="nearest"`), or a continuous one /
    None for models conditioned on log(sigma) / 4.
    """

    def __init__(
        self,
        network,
        schedule: NoiseSchedule | None = None,
        prediction: str = "eps",
        *,
        sigma_data: float | None = None,
        timestep_mode: str = "interp",
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        if timestep_mode not in ("interp", "nearest"):
            raise ValueError(f"unknown timestep_mode {timestep_mode!r}; valid: interp, nearest")
        discrete = schedule is not None and schedule.is_discrete
        if sigma_data is None:
            sigma_data = 1.0 if discrete else 0.5
        if discrete and sigma_data != 1.0:
            raise ValueError("a discrete VP schedule fixes sigma_data = 1 (its x_t has unit variance)")
        self.network = network
        self.schedule = schedule
        self.prediction = prediction
        self.sigma_data = float(sigma_data)
        self.timestep_mode = timestep_mode

    @classmethod
    def from_network(cls, network, schedule: NoiseSchedule | None, prediction: str = "eps", **kwargs) -> "Denoiser":
        """The public spelling of the constructor: `Denoiser.from_network(net, schedule, "v")`."""
        return cls(network, schedule, prediction, **kwargs)

    def precondition(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) for each sigma, in float64."""
        sigma = sigma.to(torch.float64)
        sd = self.sigma_data
        c_in = (sigma**2 + sd**2).rsqrt()
        if self.prediction == "eps":
            c_skip, c_out = torch.ones_like(sigma), -sigma
        elif self.prediction == "x0":
            c_skip, c_out = torch.zeros_like(sigma), torch.ones_like(sigma)
        else:
            c_skip = sd**2 / (sigma**2 + sd**2)
            c_out = sigma * sd * c_in * (-1 if self.prediction == "v" else 1)
        if self.schedule is not None and self.schedule.is_discrete:
            c_noise = self.schedule.sigma_to_t(sigma, self.timestep_mode)
        else:
            c_noise = sigma.clamp(min=1e-300).log() / 4
        return c_skip, c_out, c_in, c_noise

    def _evaluate(self, x: Tensor, sigma: Tensor, cond: dict) -> tuple[Tensor, Tensor, Tensor]:
        """The network output and (c_skip, c_out), preconditioning computed once."""
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must have shape [{x.shape[0]}] (one per sample of x), got {tuple(sigma.shape)}")
        c_skip, c_out, c_in, c_noise = self.precondition(sigma)
        output = self.network(per_sample(c_in, x) * x, c_noise.to(x.dtype), **cond)
        if output.shape != x.shape:
            raise ValueError(f"the network returned shape {tuple(output.shape)} for input {tuple(x.shape)}")
        return output, c_skip, c_out

    def network_output(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        """The raw network output F(c_in x, c_noise) (what the training loss compares)."""
        return self._evaluate(x, sigma, cond)[0]

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        output, c_skip, c_out = self._evaluate(x, sigma, cond)
        return per_sample(c_skip, x) * x + per_sample(c_out, x) * output


class ClampedDenoiser(nn.Module):
    """Clamps the denoised estimate to the data range (DDPM's `clip_sample`): a pixel model trained
    on [-1, 1] never produces values outside it, and clamping stops an early, poor x0 estimate at
    high noise from throwing a trajectory off the data."""

    def __init__(self, denoiser, low: float = -1.0, high: float = 1.0):
        super().__init__()
        if not low < high:
            raise ValueError(f"need low < high, got {low}, {high}")
        self.denoiser, self.low, self.high = denoiser, low, high

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        return self.denoiser(x, sigma, **cond).clamp(self.low, self.high)


# ---------------------------------------------------------------------------------------------
# Guidance: wrappers with the denoiser's own signature, so every sampler works with them unchanged
# ---------------------------------------------------------------------------------------------


def concat_cond(a: dict, b: dict) -> dict:
    """Two conditioning dicts as one batch: tensors concatenated along the batch, text states and
    masks padded to the longer sequence first (the padding is masked out)."""
    if set(a) != set(b):
        raise ValueError(f"conditional and unconditional inputs need the same keywords, got {sorted(a)} and {sorted(b)}")
    out = {}
    for key, u in a.items():
        v = b[key]
        if u is None or v is None:
            if u is not v:
                raise ValueError(f"{key!r} is given for one branch of the guidance but not the other")
            out[key] = None
            continue
        if key in ("context", "context_mask") and u.shape[1] != v.shape[1]:
            length = max(u.shape[1], v.shape[1])
            pad = lambda t: torch.nn.functional.pad(t, (0, 0) * (t.ndim - 2) + (0, length - t.shape[1]))  # noqa: E731
            u, v = pad(u), pad(v)
        out[key] = torch.cat([u, v])
    return out


def _raw_output_coefficients(denoiser, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of the wrapped model, so D can be mapped back to the network's own output
    (eps for eps models, v for v models). Models without preconditioning count as eps models."""
    base = denoiser
    while not hasattr(base, "precondition") and hasattr(base, "denoiser"):
        base = base.denoiser
    if hasattr(base, "precondition"):
        c_skip, c_out = base.precondition(sigma)[:2]
        return c_skip, c_out
    return torch.ones_like(sigma, dtype=torch.float64), -sigma.to(torch.float64)


class GuidedDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022): D = D_u + scale (D_c - D_u), with the
    conditional and unconditional passes batched into one network call.

    `uncond` holds the unconditional keywords (the "no class" label, the empty prompt's states, or
    a negative prompt's); it is broadcast to the batch when it has batch size 1.
    `rescale` (Lin et al. 2023, Alg. 2) matches the guided output's standard deviation to the
    conditional one's, in the network's own output space (as diffusers does), and blends
    `rescale` of that in. `interval=(low, high)` applies guidance only where low < sigma <= high
    (Kynkäänniemi et al. 2024); elsewhere the conditional model alone runs.
    """

    def __init__(self, denoiser, scale: float, uncond: dict, *, rescale: float = 0.0,
                 interval: tuple[float, float] | None = None):
        super().__init__()
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"guidance scale must be >= 0 (1 = no guidance), got {scale}")
        if not 0 <= rescale <= 1:
            raise ValueError(f"guidance rescale must lie in [0, 1], got {rescale}")
        if interval is not None and not interval[0] < interval[1]:
            raise ValueError(f"guidance interval must be (low, high) with low < high, got {interval}")
        self.denoiser, self.scale, self.uncond = denoiser, float(scale), dict(uncond)
        self.rescale, self.interval = float(rescale), interval

    def _uncond_for(self, batch: int) -> dict:
        out = {}
        for key, value in self.uncond.items():
            if isinstance(value, Tensor) and value.shape[0] == 1 and batch > 1:
                value = value.expand(batch, *value.shape[1:])
            out[key] = value
        return out

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if self.scale == 1.0:
            return self.denoiser(x, sigma, **cond)
        guided = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        if self.interval is not None:
            guided = (sigma > self.interval[0]) & (sigma <= self.interval[1])
            if not guided.any():
                return self.denoiser(x, sigma, **cond)
        both = concat_cond(cond, self._uncond_for(x.shape[0]))
        d_cond, d_uncond = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        out = d_uncond + self.scale * (d_cond - d_uncond)
        if self.rescale > 0:
            out = self._rescaled(x, sigma, d_cond, out)
        return torch.where(per_sample(guided, x).bool(), out, d_cond)

    def _rescaled(self, x: Tensor, sigma: Tensor, d_cond: Tensor, d_guided: Tensor) -> Tensor:
        c_skip, c_out = (per_sample(c.to(x.dtype), x) for c in _raw_output_coefficients(self.denoiser, sigma))
        safe_out = torch.where(c_out == 0, torch.ones_like(c_out), c_out)
        f_cond, f_guided = (d_cond - c_skip * x) / safe_out, (d_guided - c_skip * x) / safe_out
        dims = tuple(range(1, x.ndim))
        factor = f_cond.std(dims, keepdim=True) / f_guided.std(dims, keepdim=True).clamp(min=1e-12)
        f_new = f_guided * (self.rescale * factor + 1 - self.rescale)
        return torch.where(c_out == 0, d_guided, c_skip * x + c_out * f_new)


class DynamicThresholdDenoiser(nn.Module):
    """Imagen's dynamic thresholding (Saharia et al. 2022): per sample, s = the `percentile` of
    |x0_hat| (at least `max_value`); x0_hat is clamped to [-s, s] and divided by s, then scaled
    back to [-max_value, max_value]. It keeps high guidance scales from saturating pixels, and is
    the identity on estimates already inside the range."""

    def __init__(self, denoiser, percentile: float = 0.995, max_value: float = 1.0):
        super().__init__()
        if not 0 < percentile <= 1:
            raise ValueError(f"percentile must lie in (0, 1], got {percentile}")
        if max_value <= 0:
            raise ValueError(f"max_value must be > 0, got {max_value}")
        self.denoiser, self.percentile, self.max_value = denoiser, float(percentile), float(max_value)

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        x0 = self.denoiser(x, sigma, **cond)
        flat = x0.reshape(x0.shape[0], -1).abs().float()
        s = torch.quantile(flat, self.percentile, dim=1).clamp(min=self.max_value).to(x0.dtype)
        s = per_sample(s, x0)
        return x0.clamp(-s, s) / s * self.max_value
