"""Editing with a model trained only to generate: inpainting (replace, RePaint) and img2img (SDEdit).

Both drive any sampler in the registry, unchanged, so every deterministic or stochastic sampler
works here; neither needs retraining.

Inpainting runs the sampler one noise interval [sigma_i, sigma_i+1] at a time (`sample` with a sequence ending above 0) and
after each step pastes the known pixels, forward-noised afresh to the new level (x0 + sigma z), over
the sample ("replace"; Song et al. 2021, app. I.2). RePaint (Lugmayr et al. 2022) adds resampling:
after some steps the whole image is noised back up `jump_length` levels (x + sqrt(hi^2 - lo^2) z,
which is q(x_hi | x_lo) in sigma space for VP and VE models alike) and walked down again, `resample`
times in all, so the generated region has time to agree with the pasted one.

Reconstruction guidance (Ho et al. 2022, "Video Diffusion Models", sec. 3.1), `reconstruction=w`,
goes further than pasting: each denoised estimate D(x) is moved against the gradient, with respect
to x, of its squared error on the known pixels, D(x) - (w / 2) grad_x |known - D(x)|^2. Pasting
only fixes the known pixels of x; the gradient tells the model's estimate of the *unknown* pixels
which way makes the known ones come out right, so the fill is chosen to agree with them. It costs
one backward pass per model evaluation (about 2x the time). On held-out 8x8 digits with the right
half masked (100-step schedule), RePaint's fills were the original digit 92% of the time with
w = 20, replace-only's 86%; without guidance (50 steps) both about 52% (benchmarks/RESULTS.md).

Multistep samplers (lms, deis, ipndm, plms, pndm, dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde, unipc) keep
a history of model outputs from one smooth trajectory. Pasting changes x after every step and RePaint
even walks upwards, so that history would describe a path the sample is no longer on. Each interval
is therefore a fresh sampler call and a multistep sampler takes its own first step there: lms, deis,
ipndm, unipc and dpmpp_2m become Euler (= DDIM = DPM-Solver-1 in sigma space, exactly), the SDE
variants their first-order SDE step, plms a Heun step and pndm a Runge-Kutta-4 step. Single-step
samplers (euler, heun, ddim, ddpm, the ancestral ones, dpmpp_sde) are unchanged by the split, and
dpm_adaptive adapts within each interval.

img2img needs no such split: the input noised to the level where `strength` enters the schedule is
a valid sampler start, and the sampler runs to 0 as usual.

Noise comes only from per-sample generators (as in `generate`): image i of a request depends only on
(seed, i) and on its own inputs.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..denoiser import ClampedDenoiser, GuidedDenoiser
from ..sampling import get_sampler, initial_noise, randn_like, sample, seeded_generators
from ..schedules import NoiseSchedule

METHODS = ("repaint", "replace")
DEFAULT_RECONSTRUCTION = 20.0  # of `diffusekit inpaint` (the library's `inpaint` defaults to 0: off)

# The three noise streams of a request (the first two as in `generate`, so img2img at strength 1
# and inpainting with everything masked start exactly where `generate` does).
_START, _SAMPLER, _PASTE = 0, 1_000_003, 2_000_006


def repaint_path(steps: int, jump_length: int, resample: int) -> list[int]:
    """The indices into a `steps`-step sigma sequence (0 = sigma_max .. steps = 0) in the order
    RePaint visits them. A step down is +1; a jump back up is -jump_length. As in RePaint's
    `get_schedule_jump`, the jumps start at the last nonzero level and every `jump_length` levels
    above it (only where a full jump fits), each `resample - 1` times. resample = 1 is "replace"."""
    if not isinstance(jump_length, int) or jump_length < 1:
        raise ValueError(f"jump_length must be an integer >= 1, got {jump_length!r}")
    if not isinstance(resample, int) or resample < 1:
        raise ValueError(f"resample must be an integer >= 1, got {resample!r}")
    if resample > 1 and jump_length >= steps:
        raise ValueError(f"jump_length ({jump_length}) must be smaller than steps ({steps}) to resample; "
                         "lower jump_length or raise steps")
    jumps_left = {k: resample - 1 for k in range(steps - 1, jump_length - 1, -jump_length)}
    path, k = [0], 0
    while k < steps:
        k += 1
        path.append(k)
        if jumps_left.get(k, 0) > 0:
            jumps_left[k] -= 1
            k -= jump_length
            path.append(k)
    return path


class ReconstructionGuidedDenoiser(torch.nn.Module):
    """D(x) - (weight / 2) grad_x sum over known pixels of (known - D(x))^2 (module notes).
    `known` and `keep` (1 = known pixel) are [B or 1, ...] like the batch it denoises."""

    def __init__(self, denoiser, known: Tensor, keep: Tensor, weight: float):
        super().__init__()
        self.denoiser, self.known, self.keep, self.weight = denoiser, known, keep, weight

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            denoised = self.denoiser(x, sigma, **cond)
            error = ((self.known - denoised) * self.keep).square().sum()
            (grad,) = torch.autograd.grad(error, x)
        return (denoised - 0.5 * self.weight * grad).detach()


def _batch_denoiser(denoiser, rows: slice, uncond: dict | None, guidance: float, clip, reconstruction=None):
    """The denoiser for one batch of rows: classifier-free guidance, reconstruction guidance
    (`(known, keep, weight)` or None), then clamping (as `generate`)."""
    if guidance != 1.0:
        batch_uncond = {k: v if v.shape[0] == 1 else v[rows] for k, v in uncond.items()}
        denoiser = GuidedDenoiser(denoiser, guidance, batch_uncond)
    if reconstruction is not None:
        denoiser = ReconstructionGuidedDenoiser(denoiser, *reconstruction)
    return denoiser if clip is None else ClampedDenoiser(denoiser, *clip)


def _check_common(image: Tensor, steps: int, cond: dict | None, uncond: dict | None, guidance: float,
                  sampler: str, batch_size: int) -> None:
    get_sampler(sampler)  # a clear error for an unknown name before any work
    if not isinstance(image, Tensor) or not torch.is_floating_point(image) or image.ndim < 2:
        raise ValueError(f"image must be a floating-point tensor [B, C, ...], got {image!r:.80}")
    if not torch.isfinite(image).all():
        raise ValueError("image holds NaN or infinite values")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if guidance != 1.0 and uncond is None:
        raise ValueError("guidance needs the unconditional inputs (uncond=...)")
    for key, value in (cond or {}).items():
        if isinstance(value, Tensor) and value.shape[0] != image.shape[0]:
            raise ValueError(f"cond[{key!r}] has batch {value.shape[0]}, the image batch is {image.shape[0]}")


@torch.no_grad()
def inpaint(denoiser, schedule: NoiseSchedule, image: Tensor, mask: Tensor, *, method: str = "repaint",
            sampler: str = "ddpm", steps: int = 50, spacing: str = "karras", jump_length: int = 10,
            resample: int = 10, seed: int = 0, batch_size: int = 256, cond: dict | None = None,
            uncond: dict | None = None, guidance: float = 1.0, clip: tuple[float, float] | None = None,
            progress: bool = False, sigmas: Tensor | None = None, reconstruction: float = 0.0,
            **options) -> Tensor:
    """Fill the pixels where `mask` is 1 so that they fit the rest of `image`; [B, C, ...] like image.

    image: [B, C, ...] in the model's data space ([-1, 1] for pixel models). mask: 0/1 (or bool),
    [B or 1, C or 1, ...spatial as image]; 1 = generate, 0 = keep. The kept pixels of the result
    equal `image` exactly. `method` "replace" pastes the noised known pixels after each step;
    "repaint" also resamples (`jump_length`, `resample`: see `repaint_path`; RePaint used 10 and 10
    with DDPM's sampler, the default here). The sampler takes one step per level walked down:
    `steps` plus jump_length per jump (410 for 50 steps with 10 and 10), each at its single-step
    cost (see the module notes on multistep samplers); `**options` are the sampler's own.
    `reconstruction` > 0 adds reconstruction guidance of that weight (module notes; 0 = off).
    Conditioning, guidance and clip work as in `generate`; `sigmas` (a whole sequence) replaces
    `steps` and `spacing`."""
    if sigmas is not None:
        steps = len(sigmas) - 1
    _check_common(image, steps, cond, uncond, guidance, sampler, batch_size)
    if method not in METHODS:
        raise ValueError(f"unknown inpainting method {method!r}; valid: {', '.join(METHODS)}")
    if not (isinstance(reconstruction, (int, float)) and math.isfinite(reconstruction) and reconstruction >= 0):
        raise ValueError(f"reconstruction (the guidance weight) must be a finite number >= 0, got {reconstruction!r}")
    mask = torch.as_tensor(mask)
    batch, channels = image.shape[:2]
    if (mask.ndim != image.ndim or mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, channels)
            or mask.shape[2:] != image.shape[2:]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not fit image shape {tuple(image.shape)}; "
                         f"expected [{batch} or 1, {channels} or 1, {', '.join(map(str, image.shape[2:]))}]")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must hold only 0 (keep) and 1 (fill); threshold it first, e.g. mask > 0.5")
    fill = mask.to(device=image.device, dtype=torch.bool)
    path = repaint_path(steps, jump_length, resample) if method == "repaint" else list(range(steps + 1))
    sigmas = (schedule.get_sigmas(steps, spacing) if sigmas is None else torch.as_tensor(sigmas)).tolist()

    out = []
    for start in range(0, batch, batch_size):
        count = min(batch_size, batch - start)
        rows = slice(start, start + count)
        step_gens = seeded_generators(seed + _SAMPLER, count, start=start)
        paste_gens = seeded_generators(seed + _PASTE, count, start=start)
        known, known_fill = image[rows], (fill[rows] if fill.shape[0] > 1 else fill)
        batch_cond = None if cond is None else {k: v[rows] for k, v in cond.items()}
        guide = (known, (~known_fill).to(known.dtype), reconstruction) if reconstruction > 0 else None
        batch_denoiser = _batch_denoiser(denoiser, rows, uncond, guidance, clip, guide)

        x = initial_noise(known.shape, sigmas[0], variance_preserving=schedule.is_discrete, dtype=known.dtype,
                          generator=seeded_generators(seed + _START, count, start=start)).to(known.device)
        x = torch.where(known_fill, x, known + sigmas[0] * randn_like(known, paste_gens))
        for here, there in tqdm(list(zip(path, path[1:])), disable=not progress, desc=f"inpaint ({method})"):
            if there < here:  # RePaint's jump: q(x_hi | x_lo) for the whole image
                x = x + randn_like(x, paste_gens) * math.sqrt(sigmas[there] ** 2 - sigmas[here] ** 2)
                continue
            x = sample(batch_denoiser, x, torch.tensor([sigmas[here], sigmas[there]], dtype=torch.float64), sampler,
                       generator=step_gens, cond=batch_cond, **options)
            noised = known if sigmas[there] == 0 else known + sigmas[there] * randn_like(known, paste_gens)
            x = torch.where(known_fill, x, noised)
        out.append(x)
    return torch.cat(out)


def img2img_sigmas(sigmas: Tensor, strength: float) -> Tensor:
    """The tail of a whole sampling sequence that img2img walks: diffusers' rule, the last
    floor(steps * strength) steps (at least one), so the first (1 - strength) of the schedule is
    skipped. (The 1e-9 keeps 0.57 * 100 = 56.999... at 57.)"""
    if not (isinstance(strength, (int, float)) and 0 <= strength <= 1):
        raise ValueError(f"strength must lie in [0, 1] (0 returns the input, 1 ignores it), got {strength!r}")
    steps = len(sigmas) - 1
    if strength == 0:  # nothing to run: the sequence is just its final level
        return sigmas[-1:]
    run = min(steps, max(1, math.floor(steps * strength + 1e-9)))
    return sigmas[steps - run:]


@torch.no_grad()
def img2img(denoiser, schedule: NoiseSchedule, image: Tensor, *, strength: float = 0.6, sampler: str = "dpmpp_2m",
            steps: int = 25, spacing: str = "karras", seed: int = 0, batch_size: int = 256,
            cond: dict | None = None, uncond: dict | None = None, guidance: float = 1.0,
            clip: tuple[float, float] | None = None, progress: bool = False, sigmas: Tensor | None = None,
            **options) -> Tensor:
    """SDEdit (Meng et al. 2022): noise `image` [B, C, ...] to the level where `strength` enters the
    schedule (`img2img_sigmas`) and sample down from there with any sampler; [B, C, ...].

    Small strength keeps the input's layout and detail (0 returns it unchanged), strength 1 ignores the input: the full
    schedule starts from pure noise exactly as `generate` does (noise * sqrt(1 + sigma_max^2) for a
    VP model), and with the same seed gives the same images. Below 1 the start is the exact forward
    sample x0 + sigma eps. Conditioning, guidance and clip work as in `generate`; `sigmas` (a whole
    sequence) replaces `steps` and `spacing`."""
    _check_common(image, steps, cond, uncond, guidance, sampler, batch_size)
    full = schedule.get_sigmas(steps, spacing) if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float64)
    sigmas = img2img_sigmas(full, strength)
    if len(sigmas) == 1:  # strength 0: the input, untouched
        return image.clone()
    batch = image.shape[0]
    out = []
    for start in range(0, batch, batch_size):
        count = min(batch_size, batch - start)
        rows = slice(start, start + count)
        noise_gens = seeded_generators(seed + _START, count, start=start)
        if len(sigmas) == len(full):  # the whole schedule: plain generation
            x = initial_noise(image[rows].shape, float(sigmas[0]), variance_preserving=schedule.is_discrete,
                              dtype=image.dtype, generator=noise_gens).to(image.device)
        else:
            x = image[rows] + float(sigmas[0]) * randn_like(image[rows], noise_gens)
        batch_cond = None if cond is None else {k: v[rows] for k, v in cond.items()}
        out.append(sample(_batch_denoiser(denoiser, rows, uncond, guidance, clip), x, sigmas, sampler,
                          generator=seeded_generators(seed + _SAMPLER, count, start=start), progress=progress,
                          cond=batch_cond, **options))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# The command line: `diffusekit inpaint` and `diffusekit img2img`
# ---------------------------------------------------------------------------------------------


def _load_model_image(path, model, resize: bool) -> Tensor:
    """The input PNG/JPEG as [1, C, H, W] in [-1, 1], in the model's channels and size."""
    from PIL import Image

    from ..images import load_image, pil_to_tensor

    channels, height, width = model.image_shape
    image = load_image(path, "L" if channels == 1 else "RGB")
    if image.size != (width, height):
        if not resize:
            raise ValueError(f"{path} is {image.width}x{image.height}, the model makes {width}x{height} images; "
                             "give an image of that size or pass --resize")
        image = image.resize((width, height), Image.BICUBIC)
    return pil_to_tensor(image)[None]


def _load_mask(path, size: tuple[int, int], resize: bool) -> Tensor:
    """The mask as [1, 1, H, W] of 0/1 (white = fill); grey levels are thresholded at half, with a note."""
    import numpy as np
    from PIL import Image

    from ..images import load_image

    mask = load_image(path, "L")
    if mask.size != size:
        if not resize:
            raise ValueError(f"mask {path} is {mask.width}x{mask.height}, the image is {size[0]}x{size[1]}; "
                             "they must match (or pass --resize)")
        mask = mask.resize(size, Image.NEAREST)
    values = np.asarray(mask)
    if not np.isin(values, (0, 255)).all():
        print(f"note: mask {path} is not pure black/white; pixels >= 128 count as fill", file=sys.stderr)
    fill = torch.from_numpy(values >= 128)
    if not fill.any():
        raise ValueError(f"mask {path} is all black: nothing to fill (white = fill, black = keep)")
    return fill[None, None].float()


def _conditioning(args, model):
    cond, uncond = model.conditioning(1, class_labels=args.class_label, prompts=args.prompt,
                                      negative_prompt=args.negative_prompt, device=args.device)
    if args.guidance < 0:
        raise ValueError(f"--guidance must be >= 0 (1 = no guidance), got {args.guidance}")
    return cond, uncond, (args.guidance if cond is not None else 1.0)


def _stable_diffusion_args(args) -> bool:
    """True when the command names a Stable Diffusion model (--model, or RUN is a diffusers folder or a
    single checkpoint file) rather than a diffusekit run; then the Stable Diffusion pipeline runs it."""
    from pathlib import Path

    if args.model and args.run_dir:
        raise ValueError("give either RUN or --model, not both")
    if not (args.model or args.run_dir):
        raise ValueError("give a run folder (RUN) or a Stable Diffusion model (--model PATH)")
    path = Path(args.model or args.run_dir)
    return bool(args.model) or path.is_file() or (path / "model_index.json").exists()


def _resolve_defaults(args, **defaults) -> None:
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _run_inpaint(args) -> None:
    from ..images import save_image, tensor_to_pil
    from ..train import load

    if _stable_diffusion_args(args):
        from .stable_diffusion import run_command

        if args.reconstruction:
            raise ValueError("--reconstruction is for diffusekit runs; Stable Diffusion inpainting pastes latents "
                             "(--method replace or repaint) or uses an inpainting U-Net")
        return run_command(args, "inpaint")
    _resolve_defaults(args, sampler="ddpm", steps=50, spacing="karras", guidance=3.0, method="repaint",
                      reconstruction=DEFAULT_RECONSTRUCTION)

    path = repaint_path(args.steps, args.jump_length, args.resample) if args.method == "repaint" else None
    model = load(args.run_dir, device=args.device)
    image = _load_model_image(args.image, model, args.resize).to(args.device)
    mask = _load_mask(args.mask, (image.shape[-1], image.shape[-2]), args.resize).to(args.device)
    cond, uncond, guidance = _conditioning(args, model)
    # latent models edit the image's latents (the mask at the latent grid's size) and decode the result
    known = model.encode(image)
    mask_known = mask if known.shape[-2:] == mask.shape[-2:] else \
        (torch.nn.functional.adaptive_max_pool2d(mask, known.shape[-2:]) > 0).float()
    x = inpaint(model.denoiser, model.schedule, known, mask_known, method=args.method, sampler=args.sampler,
                steps=args.steps, spacing=args.spacing, jump_length=args.jump_length, resample=args.resample,
                seed=args.seed, cond=cond, uncond=uncond, guidance=guidance,
                clip=None if args.no_clip else model.sample_clip, progress=True, reconstruction=args.reconstruction)
    x = model.decode(x, check_scale=False)
    if model.autoencoder is not None:  # decoding blurs the seam; keep the known pixels exactly anyway
        x = torch.where(mask.bool(), x, image)
    save_image(tensor_to_pil(x[0]), args.output)
    walked = args.steps if path is None else sum(b > a for a, b in zip(path, path[1:]))
    print(f"wrote {args.output} (inpaint, {args.method}, reconstruction guidance {args.reconstruction:g}, "
          f"{args.sampler}, {walked} sampler steps for a {args.steps}-step schedule, seed {args.seed}) from {model.path}")


def _run_img2img(args) -> None:
    from ..images import save_image, tensor_to_pil
    from ..train import load

    if _stable_diffusion_args(args):
        from .stable_diffusion import run_command

        return run_command(args, "img2img")
    _resolve_defaults(args, sampler="dpmpp_2m", steps=25, spacing="karras", guidance=3.0, strength=0.6)

    model = load(args.run_dir, device=args.device)
    image = _load_model_image(args.image, model, args.resize).to(args.device)
    cond, uncond, guidance = _conditioning(args, model)
    x = img2img(model.denoiser, model.schedule, model.encode(image), strength=args.strength, sampler=args.sampler,
                steps=args.steps, spacing=args.spacing, seed=args.seed, cond=cond, uncond=uncond,
                guidance=guidance, clip=None if args.no_clip else model.sample_clip, progress=True)
    save_image(tensor_to_pil(model.decode(x, check_scale=False)[0].clamp(-1, 1)), args.output)
    ran = len(img2img_sigmas(model.schedule.get_sigmas(args.steps, args.spacing), args.strength)) - 1
    print(f"wrote {args.output} (img2img, strength {args.strength}: {ran} of {args.steps} steps, {args.sampler}, "
          f"seed {args.seed}) from {model.path}")


def _add_common(p, sampler: str, steps: int) -> None:
    from .stable_diffusion import add_stable_diffusion_options  # (that module builds on this one)

    p.add_argument("run_dir", metavar="RUN", nargs="?",
                   help="run folder or checkpoint folder (or a Stable Diffusion folder / single file)")
    p.add_argument("--model", help="a Stable Diffusion model: diffusers folder or .safetensors/.ckpt file")
    p.add_argument("--image", required=True, help="the input image (PNG, JPEG, WebP) at the model's size")
    p.add_argument("-o", "--output", required=True, help="output image file")
    p.add_argument("--resize", action="store_true", help="resize inputs of another size to the model's")
    p.add_argument("--sampler", help=f"any registered sampler (default {sampler}; Stable Diffusion: dpmpp_2m)")
    p.add_argument("--steps", type=int, help=f"steps of the sigma schedule (default {steps}; Stable Diffusion: 25)")
    p.add_argument("--spacing", help="sigma spacing (default karras; Stable Diffusion: its scheduler config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class", dest="class_label", type=int, metavar="K", help="class-conditional models: the class")
    p.add_argument("--prompt", help="text models: the prompt")
    p.add_argument("--negative-prompt", help="text models: what to steer away from")
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance scale for conditional models (1 = none; default 3, Stable Diffusion 7.5)")
    p.add_argument("--no-clip", action="store_true", help="do not clamp denoised estimates to [-1, 1]")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    add_stable_diffusion_options(p)


def add_edit_parsers(subparsers) -> None:
    """Add `diffusekit inpaint` and `diffusekit img2img` to the CLI's subparsers."""
    p = subparsers.add_parser("inpaint", help="fill the white part of a mask so it fits the rest of an image")
    _add_common(p, "ddpm", 50)
    p.add_argument("--mask", required=True, help="mask image of the same size: white = fill, black = keep")
    p.add_argument("--method", choices=METHODS,
                   help="repaint (resampling; default for runs) or replace (paste only; default for Stable Diffusion)")
    p.add_argument("--jump-length", type=int, default=10, help="RePaint: levels per jump back up (default 10)")
    p.add_argument("--resample", type=int, default=10, help="RePaint: passes over each stretch (default 10)")
    p.add_argument("--reconstruction", type=float, metavar="W",
                   help=f"reconstruction guidance weight: pull each denoised estimate towards agreeing with the "
                        f"known pixels (default {DEFAULT_RECONSTRUCTION:g}; 0 = off, about 2x faster)")
    p.add_argument("--strength", type=float, help="Stable Diffusion inpainting U-Nets: start below pure noise")
    p.set_defaults(run=_run_inpaint)

    p = subparsers.add_parser("img2img", help="redraw an image from a noised copy (SDEdit)")
    _add_common(p, "dpmpp_2m", 25)
    p.add_argument("--strength", type=float,
                   help="how much of the schedule to run, in (0, 1]: low keeps the input, 1 ignores it "
                        "(default 0.6; Stable Diffusion 0.8)")
    p.set_defaults(run=_run_img2img)


__all__ = ["METHODS", "add_edit_parsers", "img2img", "img2img_sigmas", "inpaint", "repaint_path"]
