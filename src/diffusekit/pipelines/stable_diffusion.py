"""Stable Diffusion 1.x / 2.x on diffusekit's own U-Net, autoencoder, denoiser and samplers.

    pipe = StableDiffusion.from_pretrained("path/to/stable-diffusion-v1-5")  # a diffusers folder or one file
    pipe("a futuristic city with flying cars", seed=0).images[0].save("out.png")

Text-to-image, image-to-image (`image=`, `strength=`) and inpainting (`image=`, `mask_image=`) are
one call: they differ only in where sampling starts and what is pasted back, and reuse
`generate`, `img2img` and `inpaint` in latent space. An inpainting U-Net (9 input channels) sees
the mask and the masked image's latents as concat channels; a regular U-Net inpaints by pasting
the known latents back after every step.

The text encoder and tokenizer are `transformers`' CLIP; nothing is ever downloaded.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor

from ..convert.stable_diffusion import (
    SchedulerSettings,
    autoencoder_config_to_diffusers,
    detect_family,
    diffusers_autoencoder,
    module_with_weights,
    read_component_weights,
    read_json,
    read_state,
    scheduler_from_diffusers,
    stable_diffusion_scheduler,
    text_state_from_ldm,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_state_from_ldm,
)
from ..convert.autoencoder import autoencoder_state_from_ldm
from ..denoiser import Denoiser
from ..images import load_image, pil_to_tensor
from ..nn.autoencoder import AutoencoderConfig, AutoencoderKL
from ..nn.text import CLIPEncoder, _quiet_transformers, check_tokenizer_folder
from ..nn.unet import UNet, UNetConfig
from ..sampling import get_sampler
from ..train.checkpoint import load_state_strict
from .edit import img2img, inpaint
from .generate import generate

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class StableDiffusionOutput:
    images: list  # PIL images, n = len(prompts) * num_images_per_prompt
    latents: Tensor  # the final latents, scaled as the U-Net sees them (before decoding)


def _clip_modules():
    try:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    except ImportError:
        raise ValueError("Stable Diffusion needs transformers for its text encoder: pip install 'diffusekit[text]'") from None
    _quiet_transformers()
    return CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def byte_level_clip_tokenizer(path, max_length: int = 77):
    """A CLIP tokenizer without merges, over CLIP's 256 byte symbols (each also with the end-of-word
    mark): it reads any prompt, letter by letter. For models built from a config (`from_config`),
    which have no trained vocabulary to match."""
    *_, CLIPTokenizer = _clip_modules()
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    symbols = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]  # GPT-2's byte -> symbol map
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=max_length)


# random-weight configurations, for trying the pipeline offline and for speed comparisons
CONFIGS = {
    "tiny": dict(
        unet=dict(in_channels=4, image_size=16, block_out_channels=(32, 64), layers_per_block=2,
                  attention_resolutions=(16, 8), attention_type="transformer", num_heads=8, head_dim=None,
                  context_dim=768),
        vae=dict(block_out_channels=(32, 64), layers_per_block=1),
        text=dict(hidden_size=768, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=12),
    ),
    "sd15": dict(
        unet=dict(in_channels=4, image_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                  attention_resolutions=(64, 32, 16), attention_type="transformer", num_heads=8, head_dim=None,
                  context_dim=768),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    ),
}


class StableDiffusion:
    """A Stable Diffusion model: U-Net, VAE, CLIP text encoder and the noise schedule it was trained
    with. Build with `from_pretrained` (a diffusers folder or a single checkpoint file) or
    `from_config` (random weights); generate by calling it."""

    def __init__(self, unet: UNet, vae: AutoencoderKL, text_encoder: CLIPEncoder, scheduler: SchedulerSettings):
        if unet.config.context_dim != text_encoder.dim:
            raise ValueError(f"the U-Net cross-attends to {unet.config.context_dim}-wide text states, the text encoder "
                             f"gives {text_encoder.dim}: the components come from different models")
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(f"the U-Net works on {unet.config.in_channels} channels, the VAE's latents have "
                             f"{vae.config.latent_channels}: the components come from different models")
        self.unet, self.vae, self.text_encoder, self.scheduler = unet.eval(), vae.eval(), text_encoder, scheduler
        self.denoiser = Denoiser(unet, scheduler.schedule, scheduler.prediction)

    # -- loading and saving ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, *, tokenizer=None, prediction: str | None = None, image_size: int | None = None,
                        variant: str | None = None, device="cpu", dtype: torch.dtype = torch.float32) -> "StableDiffusion":
        """Load a diffusers-format folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
        scheduler/) or a single original checkpoint (.safetensors, or .ckpt read with
        weights_only=True). A single file carries no tokenizer: give `tokenizer=FOLDER` (with
        vocab.json and merges.txt), or keep a `tokenizer/` folder beside the file. `prediction`
        ("eps" or "v") and `image_size` (latent side) override what a single file implies (see
        `detect_family`); a folder's configs say it exactly. `variant` ("fp16") reads a folder's
        `*.fp16.safetensors` weight files."""
        path = Path(path)
        if path.is_dir():
            if prediction is not None or image_size is not None:
                raise ValueError("prediction= and image_size= are for single files; a folder's scheduler and U-Net "
                                 "configs set them")
            pipe = cls._from_folder(path, tokenizer, variant)
        elif path.is_file():
            pipe = cls._from_single_file(path, tokenizer, prediction, image_size)
        else:
            raise ValueError(f"no Stable Diffusion model at {path}: give a diffusers folder or a .safetensors/.ckpt file")
        return pipe.to(device, dtype)

    @classmethod
    def _from_folder(cls, path: Path, tokenizer, variant) -> "StableDiffusion":
        index = read_json(path / "model_index.json")
        for name in COMPONENTS:
            if name not in index or not (path / name).is_dir():
                raise ValueError(f"{path} has no {name}/ component (model_index.json and the folder are both needed)")
        unet = module_with_weights(UNet, unet_config_from_diffusers(read_json(path / "unet" / "config.json")),
                             read_component_weights(path / "unet", variant), path / "unet")
        vae = diffusers_autoencoder(path / "vae", variant)
        scheduler = scheduler_from_diffusers(read_json(path / "scheduler" / "scheduler_config.json"))
        _, CLIPTextModel, CLIPTokenizer = _clip_modules()
        if not (path / "text_encoder" / "config.json").exists():
            raise ValueError(f"{path / 'text_encoder'} has no config.json")
        text_model = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True, variant=variant)
        tok_dir = Path(tokenizer) if tokenizer is not None else path / "tokenizer"
        check_tokenizer_folder(tok_dir)
        tok = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
        return cls(unet, vae, CLIPEncoder(tok, text_model), scheduler)

    @classmethod
    def _from_single_file(cls, path: Path, tokenizer, prediction, image_size) -> "StableDiffusion":
        state = read_state(path)
        family = detect_family(state, prediction=prediction, image_size=image_size)
        unet = module_with_weights(UNet, family.unet, unet_state_from_ldm(state, family.unet), path)
        vae = module_with_weights(AutoencoderKL, family.autoencoder, autoencoder_state_from_ldm(state), f"{path} (VAE)")
        text_state, text_kwargs = text_state_from_ldm(state, family.text_layout)
        tok_dir = Path(tokenizer) if tokenizer is not None else path.parent / "tokenizer"
        if not tok_dir.is_dir():
            raise ValueError(f"a single-file checkpoint carries no tokenizer: pass tokenizer=FOLDER (a folder with "
                             f"CLIP's vocab.json and merges.txt, e.g. the tokenizer/ of a diffusers download) or put "
                             f"one at {tok_dir}")
        check_tokenizer_folder(tok_dir)
        CLIPTextConfig, CLIPTextModel, CLIPTokenizer = _clip_modules()
        tok = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
        text_model = CLIPTextModel(CLIPTextConfig(
            **text_kwargs, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        load_state_strict(text_model, text_state, f"{path} (text encoder)")
        return cls(unet, vae, CLIPEncoder(tok, text_model.eval()), stable_diffusion_scheduler(family.prediction))

    @classmethod
    def from_config(cls, name: str = "tiny", *, seed: int = 0, prediction: str = "eps") -> "StableDiffusion":
        """Random weights in a named layout (`tiny`: seconds on a CPU; `sd15`: Stable Diffusion 1.5's
        shapes), with a byte-level tokenizer. For trying the pipeline and measuring speed offline;
        the images are noise-like until the model is trained or real weights are loaded."""
        if name not in CONFIGS:
            raise ValueError(f"unknown Stable Diffusion config {name!r}; valid: {', '.join(CONFIGS)}")
        spec = CONFIGS[name]
        CLIPTextConfig, CLIPTextModel, _ = _clip_modules()
        torch.manual_seed(seed)
        unet = UNet(UNetConfig(**spec["unet"]))
        vae = AutoencoderKL(AutoencoderConfig(**spec["vae"]))
        with tempfile.TemporaryDirectory() as tmp:
            tok = byte_level_clip_tokenizer(tmp)
            text_model = CLIPTextModel(CLIPTextConfig(
                **spec["text"], vocab_size=len(tok), max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        return cls(unet, vae, CLIPEncoder(tok, text_model.eval()), stable_diffusion_scheduler(prediction))

    def save_pretrained(self, path, *, overwrite: bool = False) -> Path:
        """Write the diffusers folder layout (which diffusers loads too). The folder appears whole or
        not at all: it is written beside the target and renamed into place."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise ValueError(f"{path} already exists; pass overwrite=True or choose another folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            for name in COMPONENTS:
                (tmp / name).mkdir()
            unet_cfg = {**unet_config_to_diffusers(self.unet.config), "_diffusers_version": "0.30.0"}
            (tmp / "unet" / "config.json").write_text(json.dumps(unet_cfg, indent=2))
            save_file({k: v.contiguous() for k, v in self.unet.state_dict().items()},
                      str(tmp / "unet" / "diffusion_pytorch_model.safetensors"))
            vae_cfg = {**autoencoder_config_to_diffusers(self.vae.config), "_diffusers_version": "0.30.0"}
            (tmp / "vae" / "config.json").write_text(json.dumps(vae_cfg, indent=2))
            save_file({k: v.contiguous() for k, v in self.vae.state_dict().items()},
                      str(tmp / "vae" / "diffusion_pytorch_model.safetensors"))
            self.text_encoder.model.save_pretrained(tmp / "text_encoder")
            self.text_encoder.tokenizer.save_pretrained(tmp / "tokenizer")
            (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(self.scheduler.to_diffusers(), indent=2))
            index = {
                "_class_name": "StableDiffusionPipeline" if not self.unet.config.concat_channels
                else "StableDiffusionInpaintPipeline",
                "_diffusers_version": "0.30.0",
                "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", self.scheduler.to_diffusers().get("_class_name", "DDIMScheduler")],
                "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
            }
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
                os.replace(path, old / path.name)
                os.replace(tmp, path)
                shutil.rmtree(old)
            else:
                os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return path

    def to(self, device=None, dtype: torch.dtype | None = None) -> "StableDiffusion":
        """Move the U-Net and VAE (and the text encoder) to a device and/or dtype (fp16/bf16 on GPUs).
        The schedule and sampler arithmetic stay in float64/float32 whatever the weights."""
        for module in (self.unet, self.vae, self.text_encoder.model):
            module.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale(self) -> int:
        return self.vae.config.downsampling_factor

    # -- generation --------------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str]) -> dict:
        """The U-Net's cross-attention input for each prompt. Stable Diffusion attends to all 77
        positions, padding included, so no mask is passed (an all-True mask would only slow it)."""
        return {"context": self.text_encoder(prompts).states.to(self.dtype)}

    def sigmas(self, steps: int, spacing: str | None = None, final_sigma: str = "zero") -> Tensor:
        """The noise levels for `steps` sampler steps. `spacing` defaults to the scheduler config's
        timestep spacing (with its steps_offset); any spacing of `NoiseSchedule.get_sigmas` works.
        `final_sigma="sigma_min"` stops at the smallest trained noise level instead of denoising to 0,
        as diffusers' DDIM does with `set_alpha_to_one=False` (Stable Diffusion's scheduler config)."""
        if final_sigma not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigma must be 'zero' or 'sigma_min', got {final_sigma!r}")
        spacing = spacing or self.scheduler.spacing
        sched = self.scheduler.schedule
        kwargs = {}
        if spacing in ("leading", "trailing", "linspace"):
            kwargs = dict(steps_offset=self.scheduler.steps_offset if spacing == "leading" else 0,
                          set_alpha_to_one=final_sigma == "zero")
        sigmas = sched.get_sigmas(steps, spacing, **kwargs)
        return sigmas[:-1] if final_sigma == "sigma_min" else sigmas

    def _image_tensor(self, image, size: tuple[int, int] | None, what: str) -> Tensor:
        """A PIL image / path / [B, 3, H, W] tensor in [-1, 1] -> [B, 3, H, W] on the model's device."""
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image, "L" if what == "mask" else "RGB")
        if isinstance(image, Image.Image):
            if size is not None and image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.BICUBIC if what != "mask" else Image.NEAREST)
            image = pil_to_tensor(image.convert("L" if what == "mask" else "RGB"))[None]
        if not isinstance(image, Tensor) or image.ndim != 4:
            raise ValueError(f"{what} must be a PIL image, a path or a [B, C, H, W] tensor, got {type(image).__name__}")
        return image.to(self.device, torch.float32)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                 image=None, mask_image=None, strength: float | None = None, num_inference_steps: int = 25,
                 guidance_scale: float = 7.5, sampler: str = "dpmpp_2m", spacing: str | None = None,
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                 seed: int = 0, generator: torch.Generator | None = None, latents: Tensor | None = None,
                 final_sigma: str = "zero", inpaint_method: str = "replace", progress: bool = True,
                 decode_tile: int | None = None, **sampler_options) -> StableDiffusionOutput:
        """Text-to-image; with `image`, image-to-image at `strength` (default 0.8); with `image` and
        `mask_image` (white = repaint), inpainting (strength 1: from pure noise; below 1 needs an
        inpainting U-Net).

        Image i depends only on (seed, i) and its prompt (per-image generators), whatever the batch.
        `latents` ([n, 4, h, w] standard normal) or a `generator` (drawn from as diffusers does,
        `torch.randn(shape, generator=...)`) give the start noise instead; stochastic samplers'
        noise always comes from `seed`. `guidance_scale` <= 1 turns classifier-free guidance off, as in
        diffusers. `sampler` is any name in `diffusekit.SAMPLERS`, with `**sampler_options`.
        `decode_tile` (latent pixels) decodes large images in tiles."""
        get_sampler(sampler)  # an unknown name fails before any work
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        negatives = [negative_prompt or ""] * len(prompts) if not isinstance(negative_prompt, list) else negative_prompt
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if mask_image is not None and image is None:
            raise ValueError("inpainting needs the image as well as mask_image")
        if self.unet.config.concat_channels and mask_image is None:
            raise ValueError("this is an inpainting U-Net: pass image= and mask_image=")
        if strength is None:
            strength = 1.0 if mask_image is not None else 0.8
        n = len(prompts) * num_images_per_prompt
        repeat = lambda rows: [r for r in rows for _ in range(num_images_per_prompt)]  # noqa: E731
        cond = self.encode_prompt(repeat(prompts))
        guidance = guidance_scale if guidance_scale > 1 else 1.0
        uncond = self.encode_prompt(repeat(negatives)) if guidance != 1.0 else None

        f = self.vae_scale
        pixels = None
        if image is not None:
            size = (height, width) if height and width else None
            pixels = self._image_tensor(image, size, "image")
            if pixels.shape[0] == 1:
                pixels = pixels.expand(n, -1, -1, -1)
            elif pixels.shape[0] != n:
                raise ValueError(f"{pixels.shape[0]} images for {n} outputs; give one image or one per output")
            height, width = pixels.shape[-2:]
        height = height or self.unet.config.image_size * f
        width = width or self.unet.config.image_size * f
        multiple = f * self.unet.config.downsampling_factor
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple} for this model, got {height}x{width}")
        shape = (self.unet.config.in_channels, height // f, width // f)
        sigmas = self.sigmas(num_inference_steps, spacing, final_sigma)
        if generator is not None and latents is None:
            latents = torch.randn((n, *shape), generator=generator)
        if latents is not None and tuple(latents.shape) != (n, *shape):
            raise ValueError(f"latents must have shape {(n, *shape)}, got {tuple(latents.shape)}")
        clip = self.scheduler.clip_sample
        common = dict(sampler=sampler, sigmas=sigmas, seed=seed, cond=cond, uncond=uncond, guidance=guidance,
                      progress=progress, clip=None if clip is None else (-clip, clip), **sampler_options)
        # half-precision weights: autocast casts the float32 sampler state at each layer
        with torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
            out = self._sample(image, mask_image, pixels, shape, n, latents, strength,
                               inpaint_method, (height, width), common)
        if final_sigma == "sigma_min":  # diffusers decodes the variance-preserving state at that level
            out = out / math.sqrt(1 + float(sigmas[-1]) ** 2)
        decoded = self.vae.decode_latents(out.to(self.device, self.dtype), tile=decode_tile).float()
        images = [Image.fromarray(x) for x in ((decoded / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
                  .permute(0, 2, 3, 1).cpu().numpy()]
        return StableDiffusionOutput(images, out)

    def _sample(self, image, mask_image, pixels, shape, n, latents, strength, inpaint_method, size, common) -> Tensor:
        if image is None:
            return generate(self.denoiser, self.scheduler.schedule, shape, n, noise=latents, device=self.device, **common)
        known = self._encode(pixels)
        if mask_image is not None:
            return self._inpaint(known, pixels, mask_image, size, inpaint_method, latents, strength, common)
        if latents is not None:
            raise ValueError("latents= is for text-to-image; image-to-image noises the encoded image")
        return img2img(self.denoiser, self.scheduler.schedule, known, strength=strength, **common)

    def _encode(self, pixels: Tensor) -> Tensor:
        """Images -> scaled latents, by the posterior mean (deterministic; diffusers samples it)."""
        return self.vae.encode_latents(pixels.to(self.dtype), sample=False).float()

    def _inpaint(self, known: Tensor, pixels: Tensor, mask_image, size, method, latents, strength, common) -> Tensor:
        mask = self._image_tensor(mask_image, size, "mask")[:, :1]
        if mask.shape[-2:] != pixels.shape[-2:]:
            raise ValueError(f"mask_image is {mask.shape[-2]}x{mask.shape[-1]}, the image {pixels.shape[-2]}x{pixels.shape[-1]}")
        mask = (mask > 0).float()  # pil_to_tensor maps white to 1 and black to -1: white = repaint
        small = torch.nn.functional.interpolate(mask, size=known.shape[-2:])  # nearest, as diffusers
        if mask.shape[0] == 1:
            mask, small = mask.expand(known.shape[0], -1, -1, -1), small.expand(known.shape[0], -1, -1, -1)
        if not self.unet.config.concat_channels:  # a regular U-Net: paste the known latents back after each step
            if latents is not None or strength != 1.0:
                raise ValueError("a regular U-Net inpaints from noise by latent blending: latents= and strength= "
                                 "need an inpainting U-Net")
            return inpaint(self.denoiser, self.scheduler.schedule, known, small, method=method, **common)
        # the inpainting U-Net reads the mask and the masked image's latents beside the noisy latents
        masked = self._encode(pixels * (mask < 0.5))
        common["cond"] = {**common["cond"], "concat": torch.cat([small, masked], 1).to(self.dtype)}
        if common["uncond"] is not None:
            common["uncond"] = {**common["uncond"], "concat": common["cond"]["concat"]}
        if strength == 1.0:
            return generate(self.denoiser, self.scheduler.schedule, known.shape[1:], known.shape[0], noise=latents,
                            device=self.device, **common)
        return img2img(self.denoiser, self.scheduler.schedule, known, strength=strength, **common)


# ---------------------------------------------------------------------------------------------
# The command line: `diffusekit txt2img`, and `img2img` / `inpaint` given a Stable Diffusion model
# ---------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_stable_diffusion_options(p, sampling: bool = True) -> None:
    """Options only Stable Diffusion models take (shared by txt2img, img2img, inpaint and convert)."""
    p.add_argument("--tokenizer", help="single-file checkpoints: a CLIP tokenizer folder (vocab.json, merges.txt)")
    p.add_argument("--prediction", choices=("eps", "v"),
                   help="single-file checkpoints: override the parameterisation implied by the family")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype (float16/bfloat16 on GPUs)")
    if not sampling:
        return
    p.add_argument("--final-sigma", default="zero", choices=("zero", "sigma_min"),
                   help="denoise to 0 (default) or stop at the smallest trained level, as diffusers' DDIM does")


def add_stable_diffusion_parsers(subparsers) -> None:
    """`diffusekit txt2img` and `diffusekit convert` (img2img and inpaint live in `edit`)."""
    p = subparsers.add_parser("convert", help="convert a Stable Diffusion single file to a diffusers folder")
    p.add_argument("source", help="a .safetensors/.ckpt single file (or a diffusers folder, to re-save it)")
    p.add_argument("-o", "--output", required=True, help="the diffusers folder to write (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_stable_diffusion_options(p, sampling=False)
    p.set_defaults(run=_convert)

    p = subparsers.add_parser("txt2img", help="text-to-image with a Stable Diffusion model (folder or single file)")
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--model", required=True, help="diffusers folder or .safetensors/.ckpt file")
    p.add_argument("-o", "--output", required=True, help="output image (with -n > 1: NAME-0.png, NAME-1.png, ...)")
    p.add_argument("--negative-prompt", help="what to steer away from")
    p.add_argument("-n", "--num-images", type=int, default=1)
    p.add_argument("--steps", type=int, default=25, help="sampler steps (default 25)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--sampler", default="dpmpp_2m", help="any registered sampler (default dpmpp_2m)")
    p.add_argument("--spacing", help="sigma spacing (default: the scheduler config's timestep spacing)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    add_stable_diffusion_options(p)
    p.set_defaults(run=lambda args: run_command(args, "txt2img"))


def _convert(args) -> None:
    pipe = StableDiffusion.from_pretrained(args.source, tokenizer=args.tokenizer, prediction=args.prediction,
                                           dtype=DTYPES[args.dtype])
    out = pipe.save_pretrained(args.output, overwrite=args.overwrite)
    cfg = pipe.unet.config
    print(f"wrote {out} (diffusers layout; U-Net {sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.0f}M "
          f"parameters, {cfg.in_channels + cfg.concat_channels} input channels, {pipe.scheduler.prediction}-prediction, "
          f"{args.dtype})")


def run_command(args, mode: str) -> None:
    """Run txt2img / img2img / inpaint with a Stable Diffusion model and write the image(s)."""
    from ..images import save_image

    path = args.model or args.run_dir
    pipe = StableDiffusion.from_pretrained(path, tokenizer=args.tokenizer, prediction=args.prediction,
                                           device=args.device, dtype=DTYPES[args.dtype])
    kwargs = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps or 25,
                  guidance_scale=7.5 if args.guidance is None else args.guidance, sampler=args.sampler or "dpmpp_2m",
                  spacing=args.spacing, seed=args.seed, final_sigma=args.final_sigma, progress=True)
    if mode == "txt2img":
        prompt = args.prompt
        kwargs.update(height=args.height, width=args.width, num_images_per_prompt=args.num_images)
    else:
        if not args.prompt:
            raise ValueError("Stable Diffusion needs --prompt (an empty string for none)")
        prompt = args.prompt
        kwargs.update(image=args.image, strength=args.strength)
        if mode == "inpaint":
            kwargs.update(mask_image=args.mask, inpaint_method=args.method or "replace")
    images = pipe(prompt, **kwargs).images
    out = Path(args.output)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    for image, target in zip(images, paths):
        save_image(image, target)
    print(f"wrote {', '.join(map(str, paths))} ({mode}, {kwargs['sampler']}, {kwargs['num_inference_steps']} steps, "
          f"guidance {kwargs['guidance_scale']}, seed {args.seed}) from {path}")


__all__ = ["StableDiffusion", "StableDiffusionOutput", "add_stable_diffusion_parsers", "byte_level_clip_tokenizer"]
