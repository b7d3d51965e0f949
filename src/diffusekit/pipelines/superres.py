"""Super-resolution (SR3, Saharia et al. 2021) and an Imagen-style cascade (Saharia et al. 2022).

An SR model is a U-Net that also sees the low-resolution image, upsampled to the output size and
concatenated to its input channels. Trained on clean low-resolution images, such a model trusts
them too much: in a cascade it receives the base model's samples, whose small errors it then
sharpens. Noise-conditioning augmentation (Ho et al. 2022, "Cascaded Diffusion Models") noises the
low-resolution image at a random level during training and tells the network that level
(`aug_level`); at sampling time a moderate level makes the stage robust to the base model's
artefacts, and level 0 reproduces the plain SR3 model.

Augmentation levels are fractions u in [0, 1] of the diffusion schedule: the low-resolution input
is forward-noised to timestep t = u (T - 1) of the model's own (discrete) schedule, in the
variance-preserving form the network sees its main input in, and t is embedded like the time step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..sampling import randn_like, seeded_generators
from ..schedules import NoiseSchedule
from .generate import generate

_AUGMENT_STREAM = 3_000_009  # per-sample noise of the augmentation (beside generate's streams)


def degrade(images: Tensor, scale: int) -> Tensor:
    """The low-resolution version of [B, C, H, W] images: box-filter (area) downsampling by `scale`,
    the average of each scale x scale block, as a camera or image resizer would record it."""
    if not isinstance(scale, int) or scale < 2:
        raise ValueError(f"scale must be an integer >= 2, got {scale!r}")
    if images.shape[-1] % scale or images.shape[-2] % scale:
        raise ValueError(f"images of {images.shape[-2]}x{images.shape[-1]} cannot be downsampled by {scale}")
    return F.avg_pool2d(images, scale)


def upsample(low: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic upsampling to `size`, clamped to the data range [-1, 1]: the SR network's
    conditioning image, and the baseline every SR model must beat."""
    return F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


def augment(low_up: Tensor, level, schedule: NoiseSchedule, generator=None) -> tuple[Tensor, Tensor]:
    """Noise-conditioning augmentation: (the noised conditioning image, its `aug_level` for the U-Net).

    `level` (a float or a [B] tensor of fractions in [0, 1]) maps to timestep t = level (T - 1);
    the image becomes sqrt(abar_t) x + sqrt(1 - abar_t) eps (level 0: unchanged) and aug_level = t."""
    if not schedule.is_discrete:
        raise ValueError("noise-conditioning augmentation needs a discrete schedule (it embeds a timestep)")
    level = torch.as_tensor(level, dtype=torch.float64).expand(low_up.shape[0]).clone()
    if not torch.isfinite(level).all() or (level < 0).any() or (level > 1).any():
        raise ValueError(f"augmentation levels must lie in [0, 1], got {level.tolist()}")
    t = level * (schedule.num_steps - 1)
    sigma = torch.where(level > 0, schedule.t_to_sigma(t), torch.zeros_like(t))
    shape = (-1,) + (1,) * (low_up.ndim - 1)
    a = (1 / torch.sqrt(1 + sigma**2)).to(low_up.dtype).reshape(shape).to(low_up.device)
    s = (sigma / torch.sqrt(1 + sigma**2)).to(low_up.dtype).reshape(shape).to(low_up.device)
    noised = a * low_up + s * randn_like(low_up, generator)
    return noised, t.to(torch.float32).to(low_up.device)


def sr_conditioning(low: Tensor, size: tuple[int, int], level, schedule: NoiseSchedule, generator=None) -> dict:
    """The U-Net keywords for low-resolution images `low`: the augmented upsampled image and its level."""
    concat, aug_level = augment(upsample(low, size), level, schedule, generator)
    return {"concat": concat, "aug_level": aug_level}


@torch.no_grad()
def upscale(denoiser, schedule: NoiseSchedule, low: Tensor, scale: int, *, aug: float = 0.0, seed: int = 0,
            cond: dict | None = None, uncond: dict | None = None, guidance: float = 1.0, **generate_options) -> Tensor:
    """Super-resolve [B, C, h, w] images in [-1, 1] to [B, C, h scale, w scale] with an SR model.

    `aug` is the augmentation level the low-resolution input is noised to (0: trust it exactly;
    0.1-0.3 for a cascade's generated inputs). Image i depends only on (seed, i). `cond` / `uncond`
    carry text or class conditioning for a conditional SR stage; guidance acts on those, both passes
    seeing the same low-resolution image. Other options go to `generate` (sampler, steps, spacing,
    threshold, clip, progress, batch_size, device)."""
    if low.ndim != 4:
        raise ValueError(f"low-resolution images must be [B, C, h, w], got shape {tuple(low.shape)}")
    if not torch.isfinite(low).all():
        raise ValueError("the low-resolution images hold NaN or infinite values")
    n, channels, h, w = low.shape
    size = (h * scale, w * scale)
    gens = seeded_generators(seed + _AUGMENT_STREAM, n)
    sr = sr_conditioning(low, size, aug, schedule, gens)
    cond = {**(cond or {}), **sr}
    if uncond is not None:
        uncond = {**{k: (v.expand(n, *v.shape[1:]) if v.shape[0] == 1 else v) for k, v in uncond.items()}, **sr}
    return generate(denoiser, schedule, (channels, *size), n, seed=seed, cond=cond, uncond=uncond,
                    guidance=guidance, **generate_options)


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, for images in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4 / mse.clamp(min=1e-12))


__all__ = ["augment", "degrade", "psnr", "sr_conditioning", "upsample", "upscale"]
