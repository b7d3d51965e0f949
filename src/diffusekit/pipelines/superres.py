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

from ..images import psnr  # noqa: F401  (re-exported: the SR benchmark's measure)
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


def augment(low_up: Tensor, level, schedule: NoiseSchedule, generator=None, noise: Tensor | None = None
            ) -> tuple[Tensor, Tensor]:
    """Noise-conditioning augmentation: (the noised conditioning image, its `aug_level` for the U-Net).

    `level` (a float or a [B] tensor of fractions in [0, 1]) maps to timestep t = level (T - 1);
    the image becomes sqrt(abar_t) x + sqrt(1 - abar_t) eps (level 0: unchanged) and aug_level = t.
    eps is drawn from `generator` (one or one per image), or given as `noise`."""
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
    noised = a * low_up + s * (randn_like(low_up, generator) if noise is None else noise)
    return noised, t.to(torch.float32).to(low_up.device)


def sr_conditioning(low: Tensor, size: tuple[int, int], level, schedule: NoiseSchedule, generator=None,
                    noise: Tensor | None = None) -> dict:
    """The U-Net keywords for low-resolution images `low`: the augmented upsampled image and its level."""
    concat, aug_level = augment(upsample(low, size), level, schedule, generator, noise)
    return {"concat": concat, "aug_level": aug_level}


class ConsistentDenoiser(torch.nn.Module):
    """Makes every denoised estimate agree with the low-resolution image exactly: x0 + N(y - A x0),
    with A the box downsampling and N nearest upsampling (A N = I, so A of the result is y). This
    is the range-null-space projection of DDNM (Wang et al. 2023) for this degradation: it fixes
    what the low-resolution image determines (each block's mean) and leaves the model free in what
    it does not (the detail inside the blocks). The image arrives as the `low` keyword, so it is
    batched and split like any other conditioning."""

    def __init__(self, denoiser, scale: int):
        super().__init__()
        self.denoiser, self.scale = denoiser, scale

    def forward(self, x: Tensor, sigma: Tensor, low: Tensor, **cond) -> Tensor:
        x0 = self.denoiser(x, sigma, **cond)
        return x0 + F.interpolate(low.to(x0.dtype) - degrade(x0, self.scale), scale_factor=self.scale, mode="nearest")


@torch.no_grad()
def upscale(denoiser, schedule: NoiseSchedule, low: Tensor, scale: int, *, aug: float = 0.0, seed: int = 0,
            consistent: bool | None = None, cond: dict | None = None, uncond: dict | None = None,
            guidance: float = 1.0, **generate_options) -> Tensor:
    """Super-resolve [B, C, h, w] images in [-1, 1] to [B, C, h scale, w scale] with an SR model.

    `aug` is the augmentation level the low-resolution input is noised to (0: trust it exactly;
    0.1-0.3 for a cascade's generated inputs). `consistent` (default: when aug is 0) projects every
    denoised estimate onto the images whose box-downsampling is `low` (`ConsistentDenoiser`), so the
    result downsampled gives the input back exactly; a cascade's inputs carry the base model's
    errors, which the augmentation is there to let the SR stage correct, so it is off there.
    Image i depends only on (seed, i). `cond` / `uncond` carry text or class conditioning for a
    conditional SR stage; guidance acts on those, both passes seeing the same low-resolution image.
    Other options go to `generate` (sampler, steps, spacing, threshold, clip, progress, batch_size,
    device)."""
    if low.ndim != 4:
        raise ValueError(f"low-resolution images must be [B, C, h, w], got shape {tuple(low.shape)}")
    if not torch.isfinite(low).all():
        raise ValueError("the low-resolution images hold NaN or infinite values")
    n, channels, h, w = low.shape
    size = (h * scale, w * scale)
    gens = seeded_generators(seed + _AUGMENT_STREAM, n)
    sr = sr_conditioning(low, size, aug, schedule, gens)
    if aug == 0 if consistent is None else consistent:
        denoiser = ConsistentDenoiser(denoiser, scale)
        sr["low"] = low
    cond = {**(cond or {}), **sr}
    if uncond is not None:
        uncond = {**{k: (v.expand(n, *v.shape[1:]) if v.shape[0] == 1 else v) for k, v in uncond.items()}, **sr}
    return generate(denoiser, schedule, (channels, *size), n, seed=seed, cond=cond, uncond=uncond,
                    guidance=guidance, **generate_options)


# ---------------------------------------------------------------------------------------------
# Trained models: the cascade, and the `diffusekit upscale` / `diffusekit cascade` commands
# ---------------------------------------------------------------------------------------------


def superres_settings(model) -> dict:
    """The super-resolution section of a trained model's config ({"scale", "aug_max"}), or an error."""
    settings = model.config.get("superres")
    if not settings:
        raise ValueError(f"{model.path} is not a super-resolution model; train one with "
                         "`diffusekit train --task superres --scale 2 ...`")
    return settings


@torch.no_grad()
def cascade(base, sr, n: int, *, prompts=None, class_labels=None, negative_prompt: str | None = None, seed: int = 0,
            aug: float = 0.1, base_options: dict | None = None, sr_options: dict | None = None,
            device="cpu", progress: bool = False) -> tuple[Tensor, Tensor]:
    """An Imagen-style cascade of two trained models: `base` draws n images at its resolution, `sr`
    (a super-resolution model whose input size is the base's output size) upscales them, its input
    noised to augmentation level `aug`. Each stage takes its own sampler settings (`base_options`,
    `sr_options`: sampler, steps, spacing, guidance, threshold, ...) and its own conditioning from the
    same prompts (or class labels). Returns (low, high) in [-1, 1]."""
    settings = superres_settings(sr)
    channels, side, _ = base.image_shape
    sr_channels, sr_side, _ = sr.image_shape
    if (channels, side * settings["scale"]) != (sr_channels, sr_side):
        raise ValueError(f"the base model makes {channels}x{side}x{side} images but the super-resolution model "
                         f"takes {sr_channels}x{sr_side // settings['scale']}x{sr_side // settings['scale']}")

    def stage(model, options: dict | None) -> dict:
        """The stage's generate() keywords: its conditioning, guidance only if conditional, and
        clamping to the data range unless it thresholds."""
        cond, uncond = model.conditioning(n, class_labels=class_labels, prompts=prompts,
                                          negative_prompt=negative_prompt, device=device)
        options = {"guidance": 1.0, **(options or {}), "cond": cond, "uncond": uncond}
        if cond is None:
            options["guidance"] = 1.0
        if options.get("threshold") is None:
            options.setdefault("clip", model.sample_clip)
        return {"seed": seed, "device": device, "progress": progress, **options}

    low = base.decode(generate(base.denoiser, base.schedule, base.sample_shape, n, **stage(base, base_options)))
    high = upscale(sr.denoiser, sr.schedule, low.to(device), settings["scale"], aug=aug, **stage(sr, sr_options))
    return low.clamp(-1, 1), high.clamp(-1, 1)


def _stage_options(args, prefix: str) -> dict:
    get = lambda name: getattr(args, f"{prefix}{name}")  # noqa: E731
    return {"sampler": get("sampler"), "steps": get("steps"), "spacing": get("spacing"), "guidance": get("guidance"),
            "threshold": get("threshold")}


def _run_upscale(args) -> None:
    from ..images import load_image, pil_to_tensor, save_image, tensor_to_pil
    from ..train import load

    model = load(args.run_dir, device=args.device)
    settings = superres_settings(model)
    if args.scale is not None and args.scale != settings["scale"]:
        raise ValueError(f"{model.path} was trained to upscale by {settings['scale']}, not {args.scale}; "
                         f"chain two stages (diffusekit cascade) or train a --scale {args.scale} model")
    channels = model.image_shape[0]
    low = pil_to_tensor(load_image(args.image, "L" if channels == 1 else "RGB"))[None].to(args.device)
    cond, uncond = model.conditioning(1, class_labels=args.class_label, prompts=args.prompt,
                                      negative_prompt=args.negative_prompt, device=args.device)
    high = upscale(model.denoiser, model.schedule, low, settings["scale"], aug=args.aug, seed=args.seed,
                   consistent=False if args.inconsistent else None, cond=cond,
                   uncond=uncond, guidance=args.guidance if cond is not None else 1.0, sampler=args.sampler,
                   steps=args.steps, spacing=args.spacing, threshold=args.threshold,
                   clip=None if args.threshold is not None else model.sample_clip, device=args.device, progress=True)
    save_image(tensor_to_pil(high[0]), args.output)
    print(f"wrote {args.output} ({low.shape[-1]}x{low.shape[-2]} -> {high.shape[-1]}x{high.shape[-2]}, augmentation "
          f"level {args.aug}, {args.sampler}, {args.steps} steps, seed {args.seed}) from {model.path}")


def _run_cascade(args) -> None:
    from ..images import image_grid, save_image
    from ..train import load

    base, sr = load(args.base_run, device=args.device), load(args.sr_run, device=args.device)
    low, high = cascade(base, sr, args.n, prompts=args.prompt, class_labels=args.class_label,
                        negative_prompt=args.negative_prompt, seed=args.seed, aug=args.aug,
                        base_options=_stage_options(args, "base_"), sr_options=_stage_options(args, "sr_"),
                        device=args.device, progress=True)
    save_image(image_grid(high), args.output)
    if args.low_output:
        save_image(image_grid(low), args.low_output)
    print(f"wrote {args.output} ({args.n} images, {low.shape[-1]} -> {high.shape[-1]} px) from {base.path} + {sr.path}")


def _add_stage(p, prefix: str, label: str, guidance: float, threshold: float | None) -> None:
    flag = f"--{prefix.replace('_', '-')}"
    p.add_argument(f"{flag}sampler", default="dpmpp_2m", help=f"{label}: sampler (default dpmpp_2m)")
    p.add_argument(f"{flag}steps", type=int, default=25, help=f"{label}: steps (default 25)")
    p.add_argument(f"{flag}spacing", default="karras", help=f"{label}: sigma spacing (default karras)")
    p.add_argument(f"{flag}guidance", type=float, default=guidance, help=f"{label}: guidance scale (default {guidance})")
    p.add_argument(f"{flag}threshold", type=float, default=threshold,
                   help=f"{label}: dynamic thresholding percentile (default {threshold}; none: plain clamping)")


def add_superres_parsers(subparsers) -> None:
    """`diffusekit upscale` and `diffusekit cascade`."""
    p = subparsers.add_parser("upscale", help="super-resolve an image with a --task superres model")
    p.add_argument("run_dir", metavar="RUN", help="a super-resolution run or checkpoint folder")
    p.add_argument("--image", required=True, help="the low-resolution image")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--scale", type=int, help="the factor to check against the model's (it upscales by its own)")
    p.add_argument("--aug", type=float, default=0.0, help="augmentation level of the input in [0, 1] (default 0)")
    p.add_argument("--inconsistent", action="store_true",
                   help="do not project onto outputs whose downsampling is the input (the default at --aug 0)")
    p.add_argument("--prompt", help="text-conditioned models: the prompt")
    p.add_argument("--negative-prompt")
    p.add_argument("--class", dest="class_label", type=int, metavar="K", help="class-conditioned models: the class")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--spacing", default="karras")
    p.add_argument("--threshold", type=float, help="dynamic thresholding percentile (e.g. 0.995)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=_run_upscale)

    p = subparsers.add_parser("cascade", help="a base model and a super-resolution stage, as Imagen")
    p.add_argument("base_run", metavar="BASE_RUN")
    p.add_argument("sr_run", metavar="SR_RUN")
    p.add_argument("--prompt", help="the prompt (text models)")
    p.add_argument("--negative-prompt")
    p.add_argument("--class", dest="class_label", type=int, metavar="K", help="the class (class models)")
    p.add_argument("-n", type=int, default=16, help="number of images (default 16)")
    p.add_argument("-o", "--output", required=True, help="grid of the final images")
    p.add_argument("--low-output", help="also write the base stage's grid here")
    p.add_argument("--aug", type=float, default=0.1, help="augmentation level of the base samples (default 0.1)")
    _add_stage(p, "base_", "base stage", 3.0, 0.995)
    _add_stage(p, "sr_", "super-resolution stage", 1.0, 0.995)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=_run_cascade)


__all__ = ["ConsistentDenoiser", "add_superres_parsers", "augment", "cascade", "degrade", "psnr", "sr_conditioning", "superres_settings",
           "upsample", "upscale"]
