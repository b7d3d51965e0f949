"""Unconditional (and class-conditional) generation from a trained pixel-space model."""

from __future__ import annotations

import torch
from torch import Tensor

from ..denoiser import ClampedDenoiser
from ..sampling import initial_noise, sample, seeded_generators
from ..schedules import NoiseSchedule


@torch.no_grad()
def generate(denoiser, schedule: NoiseSchedule, shape: tuple[int, ...], n: int, *, seed: int = 0,
             sampler: str = "ddim", steps: int = 50, spacing: str = "karras", batch_size: int = 256,
             device="cpu", progress: bool = False, cond: dict | None = None,
             clip: tuple[float, float] | None = None, **options) -> Tensor:
    """n samples [n, *shape]. Sample i depends only on (seed, i): the same image whatever n or
    batch_size (per-sample generators for the start noise and any sampler noise). `clip` clamps
    each denoised estimate to the data range (pixel models trained on [-1, 1])."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if clip is not None:
        denoiser = ClampedDenoiser(denoiser, *clip)
    sigmas = schedule.get_sigmas(steps, spacing)
    variance_preserving = schedule.is_discrete
    out = []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        noise_gens = seeded_generators(seed, count, start=start)
        step_gens = seeded_generators(seed + 1_000_003, count, start=start)
        x = initial_noise((count, *shape), float(sigmas[0]), variance_preserving=variance_preserving,
                          generator=noise_gens).to(device)
        batch_cond = None if cond is None else {k: v[start:start + count] for k, v in cond.items()}
        out.append(sample(denoiser, x, sigmas, sampler, generator=step_gens, progress=progress, cond=batch_cond,
                          **options).cpu())
    return torch.cat(out)
