"""Latent diffusion's data side: the autoencoder a run encodes with, the encoded (cached) dataset, the
scale factor estimated from it, and the checks that keep images, latents and autoencoder consistent.

A latent run is self-contained: every checkpoint folder holds the autoencoder's weights
(`autoencoder.safetensors`) and its config (config.json's `autoencoder`, with the scale factor
estimated for this data). Sampling never goes back to the folder it was trained from, which may
have moved, been retrained or deleted; a small autoencoder adds ~4 MB per checkpoint, SD's 335 MB.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..nn.autoencoder import AutoencoderConfig, AutoencoderKL
from .checkpoint import load_state_strict, read_config, read_weights, resolve_checkpoint

AUTOENCODER_FILE = "autoencoder.safetensors"
ENCODE_BATCH = 64
SCALE_SEED = 1234  # the posterior draws the scale factor is estimated from


def load_autoencoder(path, device="cpu") -> tuple[AutoencoderKL, dict]:
    """(autoencoder in eval mode, a description for config.json) from a `train-autoencoder` run or
    checkpoint folder, a latent diffusion run (its embedded autoencoder), or a diffusers
    `AutoencoderKL` folder (config.json + diffusion_pytorch_model.safetensors)."""
    path = Path(path)
    raw = path / "config.json"
    if raw.is_file() and json.loads(raw.read_text()).get("_class_name") == "AutoencoderKL":
        from ..convert.stable_diffusion import diffusers_autoencoder  # (imports this package)

        ae = diffusers_autoencoder(path)
        return ae.to(device).eval().requires_grad_(False), {"source": str(path.resolve()), "step": None}
    try:
        folder = resolve_checkpoint(path)
        saved = read_config(folder)
    except ValueError as e:
        raise ValueError(f"--autoencoder: {e}") from None
    if saved.get("model", {}).get("type") == "autoencoder":
        spec, weights = saved["model"]["config"], folder / "model.safetensors"
    elif saved.get("autoencoder"):
        spec, weights = saved["autoencoder"]["config"], folder / AUTOENCODER_FILE
    else:
        raise ValueError(f"--autoencoder: {folder} holds a {saved.get('model', {}).get('type')} model, not an "
                         "autoencoder; train one with `diffusekit train-autoencoder`")
    ae = AutoencoderKL(AutoencoderConfig.from_dict(spec))
    load_state_strict(ae, read_weights(weights), weights)
    return ae.to(device).eval().requires_grad_(False), {"source": str(folder.resolve()), "step": saved.get("step")}


def check_fits(ae: AutoencoderKL, data, source) -> None:
    """A one-line error when the data cannot go through this autoencoder."""
    cfg, f = ae.config, ae.config.downsampling_factor
    if cfg.in_channels != data.channels:
        raise ValueError(f"--autoencoder {source} takes {cfg.in_channels}-channel images but --data {data.name} has "
                         f"{data.channels}; use an autoencoder trained on this data")
    if data.resolution % f:
        raise ValueError(f"--autoencoder {source} downsamples by {f}, which does not divide the data's "
                         f"{data.resolution}x{data.resolution} images; pass --resolution a multiple of {f}")


class LatentData:
    """A dataset seen through an autoencoder: every image encoded once (the posterior's mean and std
    cached, so each training step can draw a fresh posterior sample, as LDM trains) and scaled by
    `scaling_factor` (1 / std of the latents unless given). Offers what the trainer uses of an image
    dataset: name, channels, resolution, num_classes, len, labels and captions of the images."""

    def __init__(self, images, ae: AutoencoderKL, device, scaling_factor: float | None = None,
                 progress: bool = False):
        self.images, self.ae = images, ae
        n, mean, std = len(images), [], []
        bar = tqdm(total=n, disable=not progress, desc="encode", unit="image", dynamic_ncols=True)
        with torch.no_grad():
            for start in range(0, n, ENCODE_BATCH):
                x, _ = images.batch(torch.arange(start, min(start + ENCODE_BATCH, n)))
                posterior = ae.encode(x.to(device).float())
                mean.append(posterior.mean.cpu())
                std.append(posterior.std.cpu())
                bar.update(len(x))
        bar.close()
        self.mean, self.std = torch.cat(mean), torch.cat(std)
        self.shift = ae.config.shift_factor
        self.raw_std = estimate_std(self.mean, self.std)
        self.scaling_factor = 1.0 / self.raw_std if scaling_factor is None else float(scaling_factor)
        self.name, self.num_classes = images.name, images.num_classes
        self.channels, self.resolution = self.mean.shape[1], self.mean.shape[-1]

    def __len__(self) -> int:
        return len(self.mean)

    def __getattr__(self, name):  # labels, captions, ... of the images (only what they have)
        if name == "images":
            raise AttributeError(name)
        return getattr(self.images, name)

    def sample(self, indices: Tensor, eps: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Scaled latents (posterior mean + std * eps) of the images at `indices`, and their labels."""
        z = self.mean[indices] if eps is None else self.mean[indices] + self.std[indices] * eps
        labels = self.images.labels[indices] if getattr(self.images, "labels", None) is not None else None
        return (z - self.shift) * self.scaling_factor, labels


def estimate_std(mean: Tensor, std: Tensor) -> float:
    """The standard deviation of posterior samples over all latent values (LDM estimates its scale
    factor from this, on one batch; here on the whole encoded set, with fixed draws)."""
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(SCALE_SEED))
    z = (mean + std * eps).double()
    value = float(z.std())
    if not value > 0:
        raise ValueError("the autoencoder maps every image to the same latent (std 0); it is untrained or broken")
    return value


def decode_latents(ae: AutoencoderKL, z: Tensor, shape: tuple[int, int, int], *, check_scale: bool = True,
                   batch_size: int = ENCODE_BATCH) -> Tensor:
    """Scaled latents [B, *shape] -> images in [-1, 1], decoded in batches. With `check_scale`, latents
    whose std is far from the unit std they were trained at (e.g. unscaled ones) are refused."""
    c, h, w = shape
    if z.ndim != 4 or z.shape[1] != c:
        raise ValueError(f"this model decodes latents of shape [B, {c}, {h}, {w}], got {tuple(z.shape)}"
                         + ("; these look like images, not latents" if z.ndim == 4 and z.shape[1] == ae.config.in_channels else ""))
    if tuple(z.shape[-2:]) != (h, w):
        raise ValueError(f"this model decodes {h}x{w} latents ({h * ae.config.downsampling_factor}px images), "
                         f"got {z.shape[-2]}x{z.shape[-1]}")
    if not torch.isfinite(z).all():
        raise ValueError("the latents contain NaN or inf values")
    if check_scale and len(z.flatten()) > 1:
        s = float(z.float().std())
        if not 0.2 <= s <= 5.0:
            raise ValueError(f"the latents have std {s:.3g}, but this model's latents are scaled to about unit std "
                             f"(scaling_factor {ae.config.scaling_factor:.4g}); scale them with encode_latents' "
                             "convention, (z - shift_factor) * scaling_factor")
    with torch.no_grad():
        out = [ae.decode_latents(z[i:i + batch_size].to(next(ae.parameters()).device)).cpu()
               for i in range(0, len(z), batch_size)]
    return torch.cat(out).clamp(-1, 1)
