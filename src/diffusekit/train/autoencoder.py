"""`diffusekit train-autoencoder`: a KL autoencoder trained as the Latent Diffusion paper trains its
first stage (Rombach et al. 2022, appendix G): a pixel reconstruction loss (L1 or L2), a tiny KL
to N(0, I) that keeps the latent space smooth without squeezing detail out of it, and optionally a
patch discriminator (hinge GAN) switched on after a warm-up, because pixel losses alone give
blurry edges and the adversarial term restores them once reconstructions are already good
(switched on from the start it only destabilises the young autoencoder).

The loop is the shared training core (`core.py`): the same checkpoints, exact resume, EMA, log,
progress bar, --overwrite semantics and DDP as diffusion training. This module only supplies the
`Job`: the losses, the discriminator's own update after the autoencoder's, and preview grids of
images over their reconstructions. The log reports reconstruction PSNR and the std of the (raw)
latents, whose inverse a latent diffusion run uses as its scale factor.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import load_dataset
from ..images import psnr
from ..nn.autoencoder import PRESETS, AutoencoderConfig, AutoencoderKL, preset
from .checkpoint import FORMAT, VERSION
from .core import (ADAM_BETA2, LR_SCHEDULES, Job, adamw, check_crop_fits, check_crop_settings, check_devices, config_from_dict, cropping,
                   fit, global_batch_indices, init_distributed, random_crops, resumed_settings, step_generator,
                   validate_loop_settings)


@dataclass
class AutoencoderTrainConfig:
    data: str = "digits"
    out: str | None = None  # default: runs/autoencoder-<data name>
    preset: str = "small"  # 4x downsampling, ~1M parameters: minutes on a CPU for 32-64 px images
    latent_channels: int | None = None  # default: the preset's (4)
    resolution: int | None = None  # default: the data's own
    channels: int | None = None  # image folders: 1 (grey) or 3 (RGB, default)
    # l2 | l1 (LDM's choice, sharper once colours are right). l2 by default: while the latent does not
    # yet tell colours apart, L1's optimum is the per-channel median colour, and on the shapes (4 of
    # the 7 colours have each channel on) that is white: a small autoencoder sat at ~16 dB drawing
    # every shape white for 2,000 steps, where l2 reached 22 dB with colours in 350
    loss: str = "l2"
    kl_weight: float = 1e-6  # per pixel, as LDM's 1e-6 on its per-pixel-summed loss
    disc_start: int | None = None  # step at which the patch-GAN loss switches on (None: no discriminator)
    disc_weight: float = 0.5  # times LDM's adaptive weight (balances the GAN and reconstruction gradients)
    disc_layers: int = 2  # stride-2 levels of the discriminator: its patch sees ~10 * 2^layers pixels
    disc_channels: int = 64
    steps: int | None = None
    minutes: float | None = None
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    adam_beta2: float = ADAM_BETA2
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # decays to 0 over the --steps/--minutes budget (or constant)
    grad_clip: float = 1.0
    ema_decay: float = 0.995  # 0: the checkpoint holds the online weights
    precision: str = "fp32"
    compile: bool = False  # torch.compile the autoencoder for training
    flip: bool = False
    crop: int | None = None  # train on random crops of this side: the network is convolutional, so it
    # encodes full images afterwards, and each step costs (crop / resolution)^2 of a full-image step
    whole_after: float | None = None  # with crop: whole images once this fraction of the budget is spent
    checkpoint_every: int = 1000
    sample_every: int = 1000
    save_minutes: float | None = None
    num_samples: int = 16  # images shown over their reconstructions in the preview grids
    log_every: int = 25
    seed: int = 0
    device: str | None = None

    def validate(self) -> None:
        def fail(name, why):
            raise ValueError(f"--{name.replace('_', '-')}: {why}")

        if self.preset not in PRESETS:
            fail("preset", f"unknown {self.preset!r}; valid: {', '.join(PRESETS)}")
        if self.loss not in ("l1", "l2"):
            fail("loss", f"unknown {self.loss!r}; valid: l1, l2")
        if self.kl_weight < 0:
            fail("kl_weight", "must be >= 0")
        if self.disc_start is not None and self.disc_start < 0:
            fail("disc_start", "must be >= 0")
        if self.disc_weight < 0:
            fail("disc_weight", "must be >= 0")
        check_crop_settings(self)
        if self.disc_layers < 1 or self.disc_channels < 8:
            fail("disc_layers", "needs >= 1 layer of >= 8 channels")
        if self.latent_channels is not None and self.latent_channels < 1:
            fail("latent_channels", "must be >= 1")
        if self.num_samples < 1:
            fail("num_samples", "must be >= 1")
        validate_loop_settings(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderTrainConfig":
        return config_from_dict(cls, d)


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN (as LDM uses it): strided 4x4 convs, then two 3x3 convs down to one logit
    per patch, so it judges local texture and edges, not global layout. GroupNorm instead of
    BatchNorm: no batch statistics, so DDP ranks and micro-batches see the same function."""

    def __init__(self, in_channels: int, channels: int = 64, layers: int = 2):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(c, out, 4 if stride == 2 else 3, stride, 1, bias=False), nn.GroupNorm(8, out),
                     nn.LeakyReLU(0.2)]
            c = out
        mods.append(nn.Conv2d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*mods)
        for m in self.modules():  # DCGAN's init, as LDM's discriminator
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class AutoencoderJob(Job):
    def __init__(self, cfg: AutoencoderTrainConfig, data, net: AutoencoderKL, disc: PatchDiscriminator | None,
                 config: dict, device, world: int):
        self.cfg, self.data, self.net, self.disc, self.config, self.device = cfg, data, net, disc, config, device
        self.disc_model = disc
        self.disc_optimizer = None
        if disc is not None:
            if world > 1:
                self.disc_model = torch.nn.parallel.DistributedDataParallel(disc)
            self.disc_optimizer = adamw(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9),
                                        weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
        n = min(cfg.num_samples, len(data))
        self.preview_images = data.batch(torch.arange(n))[0]
        self.preview_columns = min(8, n)

    def check_resumable(self, saved: dict, folder: Path) -> None:
        spec = saved.get("model", {})
        if spec.get("type") != "autoencoder" or \
                AutoencoderConfig.from_dict(spec["config"]).to_dict() != self.config["model"]["config"]:
            raise ValueError(f"{folder} holds a different model than these settings; resume with the run's own settings")

    def attach(self, model, ema) -> None:
        self.model = model

    def gan_on(self, step: int) -> bool:
        return self.disc is not None and step >= self.cfg.disc_start

    def batch(self, step: int, rows: slice) -> dict:
        cfg = self.cfg
        idx = global_batch_indices(cfg.seed, step, cfg.batch_size, len(self.data))
        flips = torch.rand(cfg.batch_size, generator=step_generator(cfg.seed, step, 1)) < 0.5
        x, _ = self.data.batch(idx[rows])
        if cfg.flip:
            x = torch.where(flips[rows, None, None, None], x.flip(-1), x)
        if cropping(cfg, self.spent) and cfg.crop < x.shape[-1]:
            x = random_crops(x, cfg.crop, step_generator(cfg.seed, step, 2), cfg.batch_size, rows)
        # one posterior-noise generator per image of the global batch: the same draws on any rank layout
        gens = [torch.Generator().manual_seed(((cfg.seed * 1_000_003 + step) * 4099 + i) * 7 + 3)
                for i in range(rows.start, rows.stop)]
        return {"step": step, "x": x.to(self.device), "generators": gens, "recon": []}

    def loss(self, batch: dict, part: slice):
        cfg, x = self.cfg, batch["x"][part]
        recon, posterior = self.model(x, sample=True, generator=batch["generators"][part])
        err = (recon.float() - x).abs() if cfg.loss == "l1" else (recon.float() - x).pow(2)
        rec = err.mean()
        kl = posterior.kl().float().mean() / x[0].numel()
        value = rec + cfg.kl_weight * kl
        with torch.no_grad():
            # std of the posterior samples z: spread of the means plus the mean posterior variance
            latent_std = (posterior.mean.float().var() + posterior.var.float().mean()).sqrt()
            numbers = {"rec": rec.item(), "kl": kl.item(), "psnr": psnr(recon, x).mean().item(),
                       "latent_std": latent_std.item()}
        if self.gan_on(batch["step"]):
            self.disc.requires_grad_(False)  # the generator step moves the autoencoder only
            g_loss = -self.disc(recon).float().mean()
            self.disc.requires_grad_(True)
            weight = cfg.disc_weight * self._adaptive_weight(rec, g_loss)
            value = value + weight * g_loss
            numbers.update(g_loss=g_loss.item(), g_weight=float(weight))
        batch["recon"].append(recon.detach())
        return value, numbers

    def _adaptive_weight(self, rec: Tensor, g_loss: Tensor) -> Tensor:
        """LDM's balance: the ratio of the two losses' gradient norms at the decoder's last layer, so
        the GAN term never dominates however the loss scales drift."""
        last = self.net.decoder.conv_out.weight
        g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
        g_gan = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def after_step(self, step: int, batch: dict, lr: float) -> dict:
        """The discriminator's hinge-loss update on real images and this step's reconstructions."""
        if not self.gan_on(step):
            return {}
        for group in self.disc_optimizer.param_groups:
            group["lr"] = lr
        real, fake = batch["x"], torch.cat(batch["recon"])
        with self.autocast():  # one forward of both halves: DDP expects one forward per backward
            logits = self.disc_model(torch.cat([real, fake])).float()
        real_logits, fake_logits = logits[:len(real)], logits[len(real):]
        d_loss = 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
        d_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.disc.parameters(), self.cfg.grad_clip)
        self.disc_optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)
        return {"d_loss": d_loss.item(), "logits_real": real_logits.mean().item(),
                "logits_fake": fake_logits.mean().item()}

    def preview(self, ema):
        """Rows of images over rows of their reconstructions (posterior means, EMA weights)."""
        x = self.preview_images.to(self.device)
        recon = ema(x, sample=False)[0].clamp(-1, 1).cpu()
        cols, out = self.preview_columns, []
        for start in range(0, len(x), cols):
            out += [x[start:start + cols].cpu(), recon[start:start + cols]]
        return torch.cat(out)

    def state_dict(self) -> dict:
        if self.disc is None:
            return {}
        return {"discriminator": self.disc.state_dict(), "disc_optimizer": self.disc_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.disc is not None:
            if "discriminator" not in state:
                raise ValueError("the checkpoint has no discriminator state; resume with the run's own settings")
            self.disc.load_state_dict(state["discriminator"])
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])


def train_autoencoder(cfg: AutoencoderTrainConfig, *, resume: bool = False, overwrite: bool = False,
                      progress: bool = True, given=None) -> Path:
    """Train (or resume) an autoencoder run; returns the run folder (use it as `train --autoencoder`).
    `given`: as for `train`."""
    started = time.monotonic()  # a --minutes budget includes the setup below
    run_dir = Path(cfg.out or f"runs/autoencoder-{Path(cfg.data).name}")
    if resume:
        cfg = resumed_settings(AutoencoderTrainConfig, cfg, run_dir, given)
    cfg.validate()
    ddp, device = init_distributed(cfg.device)
    check_devices(cfg, ddp, device)
    data = load_dataset(cfg.data, cfg.resolution, cfg.channels)
    overrides = {"in_channels": data.channels, "out_channels": data.channels}
    if cfg.latent_channels is not None:
        overrides["latent_channels"] = cfg.latent_channels
    ae_config = preset(cfg.preset, **overrides)
    f = ae_config.downsampling_factor
    if data.resolution % f:
        raise ValueError(f"--preset {cfg.preset} downsamples by {f}, which does not divide the data's "
                         f"{data.resolution}x{data.resolution} images; pass --resolution a multiple of {f}")
    check_crop_fits(cfg.crop, data.resolution, f, "the downsampling factor")
    config = {
        "format": FORMAT,
        "version": VERSION,
        "model": {"type": "autoencoder", "config": ae_config.to_dict()},
        "data": {"name": data.name, "channels": data.channels, "resolution": data.resolution,
                 "num_classes": data.num_classes},
        "ema": cfg.ema_decay > 0,
        "train": asdict(cfg),
    }
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    net = AutoencoderKL(ae_config).to(device)
    disc = None
    if cfg.disc_start is not None:
        disc = PatchDiscriminator(data.channels, cfg.disc_channels, cfg.disc_layers).to(device)
    job = AutoencoderJob(cfg, data, net, disc, config, device, ddp.world)
    return fit(cfg, job, run_dir, ddp, device, resume=resume, overwrite=overwrite, progress=progress,
               desc="train-autoencoder", started=started)


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def _run(args) -> None:
    from dataclasses import fields

    given = {f.name: getattr(args, f.name) for f in fields(AutoencoderTrainConfig)
             if getattr(args, f.name, None) is not None}
    if args.steps is None and args.minutes is None and not args.resume:
        given["minutes"] = 4.0
    run_dir = train_autoencoder(AutoencoderTrainConfig(**given), resume=args.resume, overwrite=args.overwrite,
                                given=set(given))
    print(f"autoencoder saved in {run_dir}: samples.png (images over reconstructions), loss.png, log.jsonl, checkpoints/")
    print(f"train a latent diffusion model on it: diffusekit train --autoencoder {run_dir} --data ...")


def add_parser(sub) -> None:
    from ..data import DATASETS

    p = sub.add_parser("train-autoencoder", help="train a KL autoencoder for latent diffusion (L1/L2 + KL, "
                       "optional patch-GAN)")
    p.add_argument("--data", help=f"{', '.join(DATASETS)} or a folder of images (default digits)")
    p.add_argument("--out", help="run folder (default runs/autoencoder-<data>)")
    p.add_argument("--preset", choices=list(PRESETS), help="architecture (default small: 4x downsampling)")
    p.add_argument("--latent-channels", type=int, help="latent channels (default: the preset's, 4)")
    p.add_argument("--resolution", type=int, help="image side (default: the data's own; 32 for folders)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="grey (1) or RGB (3) for image folders")
    p.add_argument("--loss", choices=("l1", "l2"), help="reconstruction loss (default l2)")
    p.add_argument("--kl-weight", type=float, help="weight of the per-pixel KL to N(0, I) (default 1e-6)")
    p.add_argument("--disc-start", type=int, metavar="STEP", help="switch the patch-GAN loss on at this step "
                   "(default: no discriminator)")
    p.add_argument("--disc-weight", type=float, help="GAN loss weight, times the adaptive weight (default 0.5)")
    p.add_argument("--disc-layers", type=int, help="discriminator depth (default 2)")
    p.add_argument("--disc-channels", type=int, help="discriminator width (default 64)")
    p.add_argument("--steps", type=int, help="optimizer steps to train for")
    p.add_argument("--minutes", type=float, help="wall-clock budget from the command's start, setup included "
                   "(default 4 when --steps is not given)")
    p.add_argument("--batch-size", type=int, help="global batch size (default 32)")
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="after warm-up: a cosine decay to 0 over "
                   "the --steps/--minutes budget (default) or constant")
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--ema-decay", type=float, help="EMA of the weights (default 0.995; 0 = none)")
    p.add_argument("--precision", help="fp32, bf16 or fp16 (CUDA)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the network for "
                   "training: fewer, fused kernels after a one-time compilation (cached on disk)")
    p.add_argument("--flip", action="store_true", default=None, help="random horizontal flips")
    p.add_argument("--crop", type=int, metavar="SIDE", help="train on random SIDE x SIDE crops (a multiple of "
                   "the downsampling factor): cheaper steps, and the autoencoder still encodes whole images")
    p.add_argument("--whole-after", type=float, metavar="FRACTION", help="with --crop: train on whole images "
                   "once this fraction of the budget is spent (e.g. 0.8), so normalisation sees whole images")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--sample-every", type=int)
    p.add_argument("--save-minutes", type=float)
    p.add_argument("--log-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.set_defaults(run=_run)
