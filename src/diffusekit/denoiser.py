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
