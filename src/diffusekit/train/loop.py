"""Diffusion training: the settings (`TrainConfig`) and the diffusion `Job` that the shared training
core (`core.py`: optimizer, EMA, checkpoints, resume, logging, DDP) runs.

In pixel space the job noises images; with `--autoencoder` it noises the images' latents (encoded
once and cached, scaled to unit std by a factor estimated from the data, see `latent.py`) and the
preview grids decode them. Every random draw of a step (which images, their flips, noise levels,
noise, posterior samples) is a pure function of (seed, step) for the global batch, so resume is
bit-exact and N processes equal one.
"""

from __future__ import annotations

import inspect
import math
import time  # the core's clock too: tests patch it as loop.time.monotonic
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..data import load_dataset
from ..denoiser import Denoiser
from ..forward import WEIGHTINGS, loss as diffusion_loss, sample_training_sigmas
from ..nn.text import LearnedEncoder, build_text_encoder
from ..nn.unet import PRESETS, UNet, UNetConfig, preset
from ..pipelines.generate import generate
from ..pipelines.superres import degrade, sr_conditioning, upscale
from ..schedules import BETA_SCHEDULES, NoiseSchedule
from .checkpoint import FORMAT, VERSION, read_config, resolve_checkpoint
from .core import (ADAM_BETA2, Dist, Job, StopTraining, check_crop_fits, check_crop_settings, check_devices,  # noqa: F401
                   config_from_dict, cropping, fit, global_batch_indices, init_distributed, random_crops, read_log,
                   resumed_settings, step_generator as _step_generator, validate_loop_settings)
from .latent import AUTOENCODER_FILE, LatentData, check_fits, decode_latents, load_autoencoder


# Min-SNR's x0-space weight falls to 0 at high noise, where a prompted layout is decided: with this
# floor a 20-minute shapes model placed 94% of its shapes as asked (50% without) and got every
# attribute right twice as often. On unconditional digits it made no difference beyond noise, and
# a super-resolution stage takes its layout from its input, so only text-to-image models get it by
# default (benchmarks/RESULTS.md, issue 6).
TEXT_SNR_FLOOR = 0.1
# AdamW's beta2 for text-to-image: with 0.999 two of four 20-minute shapes runs on two threads
# spiked (loss x9 at ~1,150-1,450 steps) and never caught up; 0.99 sizes each update by the last
# ~100 steps' gradients, so a sudden large one moves the weights ~3x less (benchmarks/RESULTS.md)
TEXT_ADAM_BETA2 = 0.99
# a frozen encoder's states for every caption are cached before the first step (~30 KB each)
MAX_PRECOMPUTED_CAPTIONS = 100_000

# U-Nets sized for a few minutes (digits) to twenty (mnist, shapes) on a laptop CPU
DATA_PRESETS = {"digits": "digits", "mnist": "mnist", "shapes": "shapes", "shapes-heldout": "shapes"}


@dataclass
class TrainConfig:
    data: str = "digits"
    out: str | None = None  # default: runs/<data name>
    preset: str | None = None  # default: the data's own (DATA_PRESETS), else "digits"
    block_out_channels: tuple[int, ...] | None = None  # U-Net widths per level (default: the preset's)
    resolution: int | None = None  # default: the data's own
    channels: int | None = None  # image folders: 1 (grey) or 3 (RGB, default)
    schedule: str = "cosine"  # on 8x8-32x32 images it trains to better samples than linear (FD 5.5 vs 9.1 on digits)
    num_train_steps: int = 1000  # T
    prediction: str = "v"  # bounded x0 errors at high noise (eps errors grow with sigma); eps and x0 also work
    class_conditional: bool = False  # condition on the data's labels (classifier-free guidance ready)
    text_encoder: str | None = None  # condition on captions through cross-attention: minilm | learned | clip:PATH
    autoencoder: str | None = None  # latent diffusion: a train-autoencoder run (or diffusers AutoencoderKL folder)
    task: str = "generate"  # generate | superres (SR3: the U-Net also sees the image downsampled by `scale`)
    scale: int = 2  # superres: the upscaling factor
    aug_max: float = 0.5  # superres: training noises the low-resolution input to a level drawn from [0, aug_max]
    crop: int | None = None  # superres: train on random crops of this side (the U-Net is convolutional, so it
    # upscales whole images afterwards, and a step costs (crop / resolution)^2 of a whole-image step)
    whole_after: float | None = None  # with crop: whole images once this fraction of the budget is spent
    cond_dropout: float = 0.1  # labels/captions dropped to "unconditional" this often (for guidance)
    sample_guidance: float = 3.0  # guidance scale of the preview grids of conditional runs
    weighting: str = "min_snr"  # min-SNR-5 converges faster than L_simple (Hang et al. 2023)
    min_snr_gamma: float = 5.0
    snr_floor: float | None = None  # min_snr: lowest x0-space weight (default TEXT_SNR_FLOOR for text-to-image, else 0)
    steps: int | None = None  # budget in optimizer steps ...
    minutes: float | None = None  # ... and/or in wall-clock minutes (whichever ends first)
    batch_size: int = 64  # global batch (all ranks, all accumulation steps)
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    adam_beta2: float | None = None  # AdamW's second-moment decay (default ADAM_BETA2; TEXT_ADAM_BETA2 for text-to-image)
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # decays to 0 over the --steps/--minutes budget (or constant)
    grad_clip: float = 1.0
    ema_decay: float = 0.995  # a ~200-step horizon suits minutes-long CPU runs; raise it for long runs
    dropout: float | None = None  # default: the preset's
    precision: str = "fp32"  # fp32 | bf16 | fp16 (CUDA)
    compile: bool = False  # torch.compile the U-Net for training (benchmarks/RESULTS.md, issue 4)
    flip: bool = False  # random horizontal flips (off for digits: a flipped 7 is not a digit)
    checkpoint_every: int = 1000  # steps between checkpoints (and loss plots) ...
    sample_every: int = 1000  # ... and sample grids
    save_minutes: float | None = None  # also checkpoint + sample when this many minutes have passed
    num_samples: int = 64
    sampler: str = "dpmpp_2m"
    sample_steps: int = 25
    log_every: int = 25
    seed: int = 0
    device: str | None = None  # default: cuda if available

    def __post_init__(self):
        if self.block_out_channels is not None:  # config.json holds a list
            self.block_out_channels = tuple(self.block_out_channels)

    def validate(self) -> None:
        def fail(name, why):
            raise ValueError(f"--{name.replace('_', '-')}: {why}")

        if self.schedule not in BETA_SCHEDULES:
            fail("schedule", f"unknown {self.schedule!r}; valid: {', '.join(BETA_SCHEDULES)}")
        if self.prediction not in ("eps", "v", "x0"):
            fail("prediction", f"unknown {self.prediction!r}; valid: eps, v, x0")
        if self.weighting not in WEIGHTINGS:
            fail("weighting", f"unknown {self.weighting!r}; valid: {', '.join(WEIGHTINGS)}")
        if self.snr_floor is not None and not 0 <= self.snr_floor <= self.min_snr_gamma:
            fail("snr_floor", f"must lie in [0, min_snr_gamma={self.min_snr_gamma}], got {self.snr_floor}")
        if self.snr_floor and self.weighting != "min_snr":
            fail("snr_floor", f"is a floor under min_snr's weight; --weighting {self.weighting} has none")
        if self.preset is not None and self.preset not in PRESETS:
            fail("preset", f"unknown {self.preset!r}; valid: {', '.join(PRESETS)}")
        if self.block_out_channels is not None and (
                not self.block_out_channels or not all(isinstance(c, int) and c > 0 for c in self.block_out_channels)):
            fail("block_out_channels", f"must be positive integers, one per U-Net level, got {self.block_out_channels}")
        validate_loop_settings(self)
        if self.num_train_steps < 1:
            fail("num_train_steps", "must be >= 1")
        if self.class_conditional and self.text_encoder:
            fail("text_encoder", "a model is conditioned on classes or on text, not both")
        if not 0 <= self.cond_dropout < 1:
            fail("cond_dropout", "must lie in [0, 1)")
        if self.sample_guidance < 0:
            fail("sample_guidance", "must be >= 0")
        if self.task not in ("generate", "superres"):
            fail("task", f"unknown {self.task!r}; valid: generate, superres")
        if self.task == "superres":
            if not isinstance(self.scale, int) or self.scale < 2:
                fail("scale", f"must be an integer >= 2, got {self.scale!r}")
            if not 0 <= self.aug_max <= 1:
                fail("aug_max", f"must lie in [0, 1], got {self.aug_max}")
            if self.autoencoder:
                fail("task", "super-resolution works in pixel space; leave out --autoencoder")
        if self.crop is not None and self.task != "superres":
            fail("crop", "only --task superres trains on crops (a generator would learn to draw crops)")
        check_crop_settings(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return config_from_dict(cls, d)


def _preset_name(cfg: TrainConfig) -> str:
    return cfg.preset or DATA_PRESETS.get(cfg.data, "digits")


def _unet_overrides_for_latents(name: str, side: int, num_levels: int) -> dict:
    """A latent grid is already f times smaller than the image, so the data's preset runs on it
    without patches (a 2x2 patch on top would make a 64px image's 16x16 latents an 8x8 grid), with
    attention at the same levels of the pyramid as the preset has."""
    base = preset(name)
    levels = [i for i, r in enumerate(base.pyramid()) if r in base.attention_resolutions]
    pyramid = [side // 2**i for i in range(num_levels)]
    return {"patch_size": 1, "attention_resolutions": tuple(pyramid[i] for i in levels if pyramid[i] >= 1)}


def _model_config(cfg: TrainConfig, data, text_dim: int | None) -> dict:
    name = _preset_name(cfg)
    overrides = {"in_channels": data.channels, "image_size": data.resolution}
    preset_levels = len(preset(name).block_out_channels)
    if cfg.block_out_channels is not None:
        if len(cfg.block_out_channels) != preset_levels:
            raise ValueError(f"--block-out-channels {','.join(map(str, cfg.block_out_channels))} has "
                             f"{len(cfg.block_out_channels)} levels; U-Net preset {name!r} has {preset_levels} "
                             "(its attention resolutions are set per level): give that many, or another --preset")
        overrides["block_out_channels"] = cfg.block_out_channels
    if isinstance(data, LatentData):
        overrides.update(_unet_overrides_for_latents(name, data.resolution, preset_levels))
    if cfg.dropout is not None:
        overrides["dropout"] = cfg.dropout
    if cfg.class_conditional:
        overrides["num_classes"] = data.num_classes
    if text_dim is not None:
        overrides.update(attention_type="transformer", context_dim=text_dim, pooled_context_dim=text_dim)
    if cfg.task == "superres":  # the upsampled low-resolution image beside the input, and its noise level
        overrides.update(concat_channels=data.channels, augmentation_embedding=True)
    try:
        return preset(name, **overrides).to_dict()
    except ValueError as e:
        if isinstance(data, LatentData):
            raise ValueError(f"the {data.resolution}x{data.resolution} latents do not fit U-Net preset {name!r} ({e}); "
                             "use a larger --resolution or another --preset") from None
        raise


def text_encoder_spec(name: str | None) -> dict | None:
    """`minilm` or `clip:PATH` as the spec saved in config.json."""
    if name is None:
        return None
    if name.startswith("clip:"):
        return {"name": "clip", "path": str(Path(name[len("clip:"):]).resolve())}
    if name == "learned":  # its full shape, so a checkpoint survives changes of the defaults
        defaults = inspect.signature(LearnedEncoder).parameters
        return {"name": "learned", **{k: p.default for k, p in defaults.items()}}
    return {"name": name}


def _check_conditioning(cfg: TrainConfig, data) -> None:
    if cfg.class_conditional and not data.num_classes:
        raise ValueError(f"--class-conditional needs labelled data (digits, mnist); {data.name} has no labels")
    if cfg.text_encoder and not hasattr(data, "captions"):
        raise ValueError(f"--text-encoder needs captioned data (shapes); {data.name} has no captions")
    if cfg.task == "superres" and data.resolution % cfg.scale:
        raise ValueError(f"--scale {cfg.scale} does not divide the {data.resolution}px images; pick a --resolution "
                         f"that is a multiple of it")


def _checkpoint_config(cfg: TrainConfig, model_config: dict, images, latents: LatentData | None,
                       ae_source: dict | None) -> dict:
    config = {
        "format": FORMAT,
        "version": VERSION,
        "model": {"type": "unet", "config": model_config},
        "schedule": {"name": cfg.schedule, "num_steps": cfg.num_train_steps, "zero_terminal_snr": False},
        "prediction": cfg.prediction,
        "data": {"name": images.name, "channels": images.channels, "resolution": images.resolution,
                 "num_classes": images.num_classes},
        "text_encoder": text_encoder_spec(cfg.text_encoder),
        "conditioning": "class" if cfg.class_conditional else ("text" if cfg.text_encoder else None),
        "ema": True,
        "train": asdict(cfg),
    }
    if cfg.task == "superres":  # what `diffusekit upscale` and `cascade` read
        config["superres"] = {"scale": cfg.scale, "aug_max": cfg.aug_max}
    if latents is not None:  # the weights are in every checkpoint's autoencoder.safetensors
        config["autoencoder"] = {"config": latents.ae.config.to_dict(), **ae_source,
                                 "latent_shape": [latents.channels, latents.resolution, latents.resolution],
                                 "latent_std": latents.raw_std}
    return config


class DiffusionJob(Job):
    """The diffusion-specific part of a run: noised images (or latents), the denoising loss, preview
    samples."""

    def __init__(self, cfg: TrainConfig, data, images, net: UNet, schedule: NoiseSchedule, text_encoder,
                 config: dict, device):
        self.cfg, self.data, self.images, self.net, self.schedule = cfg, data, images, net, schedule
        self.text_encoder, self.config, self.device = text_encoder, config, device
        self.latent = isinstance(data, LatentData)
        self.denoiser = Denoiser(net, schedule, cfg.prediction)

    def check_resumable(self, saved: dict, folder: Path) -> None:
        # older configs lack new fields: compare through UNetConfig
        if UNetConfig.from_dict(saved["model"]["config"]).to_dict() != self.config["model"]["config"]:
            raise ValueError(f"{folder} holds a different model than these settings; resume with the run's own settings")

    def attach(self, model, ema) -> None:
        self.denoiser = Denoiser(model, self.schedule, self.cfg.prediction)
        self.ema = ema

    def batch(self, step: int, rows: slice) -> dict:
        # the global batch's data and randomness, then this rank's slice
        cfg, data, device = self.cfg, self.data, self.device
        idx = global_batch_indices(cfg.seed, step, cfg.batch_size, len(data))
        g = _step_generator(cfg.seed, step, 1)
        sigma = sample_training_sigmas(self.denoiser, cfg.batch_size, generator=g)
        crop = cropping(cfg, self.spent)
        side = cfg.crop if crop else data.resolution
        noise = torch.randn((cfg.batch_size, data.channels, side, side), generator=g)
        flips = torch.rand(cfg.batch_size, generator=g) < 0.5
        if self.latent:  # a fresh posterior sample of each cached latent, from its own stream
            eps = torch.randn(noise.shape, generator=_step_generator(cfg.seed, step, 2))
            x0, labels = data.sample(idx[rows], eps[rows])
        else:
            x0, labels = data.batch(idx[rows])
        if cfg.flip:  # latents: flipping the latent grid stands in for encoding the flipped image
            x0 = torch.where(flips[rows, None, None, None], x0.flip(-1), x0)
        if crop:  # offsets on the low-resolution grid: a crop's degraded version is a crop of the whole image's
            x0 = random_crops(x0, cfg.crop, _step_generator(cfg.seed, step, 4), cfg.batch_size, rows, grid=cfg.scale)
        x0, sigma, noise = x0.to(device), sigma[rows].to(device), noise[rows].to(device)
        class_labels = captions = None
        if cfg.class_conditional or self.text_encoder is not None:  # drawn only then: unconditional runs keep their streams
            drop = (torch.rand(cfg.batch_size, generator=g) < cfg.cond_dropout)[rows]
            if cfg.class_conditional:
                class_labels = torch.where(drop, data.num_classes, labels).to(device)
            else:
                captions = ["" if d else c for d, c in zip(drop.tolist(), data.captions(idx[rows]))]
        batch = {"x0": x0, "sigma": sigma, "noise": noise, "class_labels": class_labels, "captions": captions}
        if cfg.task == "superres":  # drawn last and only then: the other streams stay as they were
            level = torch.rand(cfg.batch_size, generator=g)[rows] * cfg.aug_max
            aug_noise = torch.randn(noise.shape, generator=_step_generator(cfg.seed, step, 3))[rows].to(device)
            batch.update(sr_conditioning(degrade(x0, cfg.scale), x0.shape[-2:], level, self.schedule, noise=aug_noise))
        return batch

    def loss(self, batch: dict, part: slice):
        # a learned encoder runs per micro-batch: each backward needs its own graph
        if batch["class_labels"] is not None:
            cond = {"class_labels": batch["class_labels"][part]}
        elif batch["captions"] is not None:
            cond = self.text_encoder(batch["captions"][part]).cond(pooled=True)
        else:
            cond = {}
        if "concat" in batch:
            cond.update(concat=batch["concat"][part], aug_level=batch["aug_level"][part])
        value = diffusion_loss(self.denoiser, batch["x0"][part], sigma=batch["sigma"][part],
                               noise=batch["noise"][part], weighting=self.cfg.weighting,
                               min_snr_gamma=self.cfg.min_snr_gamma, snr_floor=self.cfg.snr_floor, **cond)
        return value, {}

    def preview(self, ema):
        cfg, data = self.cfg, self.data
        preview = preview_conditioning(cfg, data, getattr(ema, "text_encoder", self.text_encoder), self.device)
        shape = (data.channels, data.resolution, data.resolution)
        if cfg.task == "superres":  # the first images' low-resolution versions, upscaled (clean inputs)
            truth = data.batch(torch.arange(cfg.num_samples) % len(data))[0].to(self.device)
            return upscale(Denoiser(ema, self.schedule, cfg.prediction), self.schedule, degrade(truth, cfg.scale),
                           cfg.scale, seed=cfg.seed, sampler=cfg.sampler, steps=cfg.sample_steps, device=self.device,
                           clip=(-1.0, 1.0), **preview)
        x = generate(Denoiser(ema, self.schedule, cfg.prediction), self.schedule, shape, cfg.num_samples,
                     seed=cfg.seed, sampler=cfg.sampler, steps=cfg.sample_steps, device=self.device,
                     clip=None if self.latent else (-1.0, 1.0), **preview)
        return decode_latents(data.ae, x, shape, check_scale=False) if self.latent else x

    def extra_weights(self) -> dict:
        return {AUTOENCODER_FILE: self.data.ae.state_dict()} if self.latent else {}


def _latent_data(cfg: TrainConfig, images, device, resume: bool, run_dir: Path, progress: bool) -> tuple:
    """The encoded data and a description of its autoencoder. A resumed run uses the autoencoder and
    scale factor embedded in its checkpoint, so it continues on exactly the latents it started on."""
    if resume:
        folder = resolve_checkpoint(run_dir)
        ae, _ = load_autoencoder(folder, device)
        embedded = read_config(folder)["autoencoder"]
        source = {k: embedded.get(k) for k in ("source", "step")}
        scale = ae.config.scaling_factor
    else:
        ae, source = load_autoencoder(cfg.autoencoder, device)
        scale = None
    check_fits(ae, images, cfg.autoencoder)
    data = LatentData(images, ae, device, scaling_factor=scale, progress=progress)
    ae.config.scaling_factor = data.scaling_factor  # what config.json records and decode_latents divides by
    return data, source


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          given=None) -> Path:
    """Train (or resume) a run; returns the run folder. `given` (with `resume`): the names of the
    settings the user gave, to warn about those the run keeps (None: those not at their default)."""
    started = time.monotonic()  # a --minutes budget includes the setup below
    run_dir = Path(cfg.out or f"runs/{Path(cfg.data).name}")
    if resume:  # the run's own settings win, except the budget and output cadence the user gives now
        # runs saved before --block-out-channels existed: the widths their network was built with
        # (a preset's widths may change; the checkpoint's may not)
        cfg = resumed_settings(TrainConfig, cfg, run_dir, given, legacy=lambda config: {
            "block_out_channels": tuple(config["model"]["config"]["block_out_channels"])})
    elif cfg.block_out_channels is None:  # resolved here, so config.json records the widths used
        cfg = replace(cfg, block_out_channels=preset(_preset_name(cfg)).block_out_channels)
    if cfg.snr_floor is None:  # resolved here, so config.json records the value used
        text_to_image = cfg.text_encoder and cfg.task == "generate" and cfg.weighting == "min_snr"
        cfg = replace(cfg, snr_floor=TEXT_SNR_FLOOR if text_to_image else 0.0)
    if cfg.adam_beta2 is None:
        cfg = replace(cfg, adam_beta2=TEXT_ADAM_BETA2 if cfg.text_encoder else ADAM_BETA2)
    cfg.validate()
    ddp, device = init_distributed(cfg.device)
    check_devices(cfg, ddp, device)

    # every setting is checked before --overwrite clears anything
    images = load_dataset(cfg.data, cfg.resolution, cfg.channels)
    _check_conditioning(cfg, images)
    data, ae_source = images, None
    if cfg.autoencoder:
        data, ae_source = _latent_data(cfg, images, device, resume, run_dir, progress and ddp.main)
    text_encoder = None
    if cfg.text_encoder:
        with torch.random.fork_rng():  # a learned encoder's initial weights follow --seed; other streams are untouched
            torch.manual_seed(cfg.seed)
            text_encoder = build_text_encoder(text_encoder_spec(cfg.text_encoder)).to(device)
        # up front only when the run will draw at least as many items as there are captions: a
        # short --steps run encodes the few it draws faster one batch at a time
        draws = cfg.steps * cfg.batch_size if cfg.steps is not None else math.inf
        if hasattr(text_encoder, "precompute") and len(images) <= min(MAX_PRECOMPUTED_CAPTIONS, draws):
            text_encoder.precompute(images.captions(range(len(images))))
    model_config = _model_config(cfg, data, text_encoder.dim if text_encoder is not None else None)
    net_cfg = UNetConfig.from_dict(model_config)
    check_crop_fits(cfg.crop, data.resolution, math.lcm(cfg.scale, net_cfg.downsampling_factor),
                    "the scale and the U-Net's downsampling")
    ckpt_config = _checkpoint_config(cfg, model_config, images, data if cfg.autoencoder else None, ae_source)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    net = UNet(net_cfg).to(device)
    if isinstance(text_encoder, LearnedEncoder):
        # trained jointly: as a submodule it is optimised, averaged (EMA), synced (DDP) and saved
        # (text_encoder.* in model.safetensors) with the U-Net, whose forward never touches it
        net.add_module("text_encoder", text_encoder)
    schedule = NoiseSchedule.from_name(cfg.schedule, cfg.num_train_steps)
    job = DiffusionJob(cfg, data, images, net, schedule, text_encoder, ckpt_config, device)
    return fit(cfg, job, run_dir, ddp, device, resume=resume, overwrite=overwrite, progress=progress, started=started)


def preview_conditioning(cfg: TrainConfig, data, text_encoder, device) -> dict:
    """generate() keywords for the preview grids: every class in turn, or the data's first captions,
    with guidance."""
    n = cfg.num_samples
    if cfg.class_conditional:
        labels = torch.arange(n) % data.num_classes
        return {"cond": {"class_labels": labels.to(device)},
                "uncond": {"class_labels": torch.full((1,), data.num_classes, device=device)},
                "guidance": cfg.sample_guidance}
    if text_encoder is not None:
        captions = data.captions(torch.arange(n))
        return {"cond": text_encoder(captions).cond(pooled=True), "uncond": text_encoder([""]).cond(pooled=True),
                "guidance": cfg.sample_guidance}
    return {}
