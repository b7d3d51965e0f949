"""Generation from a trained pixel-space model: unconditional, class- or text-conditional, with
classifier-free guidance."""

from __future__ import annotations

import torch
from torch import Tensor

from ..denoiser import ClampedDenoiser, DynamicThresholdDenoiser, GuidedDenoiser
from ..sampling import initial_noise, sample, seeded_generators, start_scale
from ..schedules import NoiseSchedule


@torch.no_grad()
def generate(denoiser, schedule: NoiseSchedule, shape: tuple[int, ...], n: int, *, seed: int = 0,
             sampler: str = "ddim", steps: int = 50, spacing: str = "karras", batch_size: int = 256,
             device="cpu", progress: bool = False, cond: dict | None = None, uncond: dict | None = None,
             guidance: float = 1.0, guidance_rescale: float = 0.0, guidance_interval: tuple[float, float] | None = None,
             threshold: float | None = None, clip: tuple[float, float] | None = None,
             sigmas: Tensor | None = None, noise: Tensor | None = None, **options) -> Tensor:
    """n samples [n, *shape]. Sample i depends only on (seed, i): the same image whatever n or
    batch_size (per-sample generators for the start noise and any sampler noise).

    `cond` holds per-sample conditioning ([n, ...] tensors); with `uncond` (batch 1 or n) and
    `guidance` != 1 it is classifier-free guidance (see GuidedDenoiser for rescale and interval).
    `threshold` applies Imagen's dynamic thresholding at that percentile; `clip` clamps each
    denoised estimate to the data range (pixel models trained on [-1, 1]).

    `sigmas` (an explicit sequence) replaces `steps` and `spacing`; `noise` ([n, *shape], standard
    normal) replaces the seeded start noise (diffusers' `latents=`)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if guidance != 1.0 and uncond is None:
        raise ValueError("guidance needs the unconditional inputs (uncond=...)")
    sigmas = schedule.get_sigmas(steps, spacing) if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float64)
    if noise is not None and tuple(noise.shape) != (n, *shape):
        raise ValueError(f"noise must have shape {(n, *shape)}, got {tuple(noise.shape)}")
    variance_preserving = schedule.is_discrete
    out = []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        noise_gens = seeded_generators(seed, count, start=start)
        step_gens = seeded_generators(seed + 1_000_003, count, start=start)
        if noise is None:
            x = initial_noise((count, *shape), float(sigmas[0]), variance_preserving=variance_preserving,
                              generator=noise_gens).to(device)
        else:
            x = noise[start:start + count].to(device) * start_scale(float(sigmas[0]), variance_preserving)
        rows = slice(start, start + count)
        batch_cond = None if cond is None else {k: v[rows] for k, v in cond.items()}
        batch_denoiser = denoiser
        if guidance != 1.0:
            batch_uncond = {k: v if v.shape[0] == 1 else v[rows] for k, v in uncond.items()}
            batch_denoiser = GuidedDenoiser(denoiser, guidance, batch_uncond, rescale=guidance_rescale,
                                            interval=guidance_interval)
        # thresholds act on the final (guided) estimate, as in Imagen
        if threshold is not None:
            batch_denoiser = DynamicThresholdDenoiser(batch_denoiser, threshold, max_value=clip[1] if clip else 1.0)
        elif clip is not None:
            batch_denoiser = ClampedDenoiser(batch_denoiser, *clip)
        out.append(sample(batch_denoiser, x, sigmas, sampler, generator=step_gens, progress=progress,
                          cond=batch_cond, **options).cpu())
    return torch.cat(out)
