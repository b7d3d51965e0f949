"""Checkpoints as folders (DESIGN.md contract 6), written atomically, and `load` for sampling.

    RUN/checkpoints/step-00001000/config.json        architecture, schedule, parameterisation, data shape
                                 /model.safetensors  EMA weights (the ones to sample from)
                                 /train_state.pt     online weights, optimizer, step, RNG states (resume)
    RUN/latest                                       name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder, fsynced, renamed into place, and only then
is `latest` switched to it (atomically). A crash at any moment leaves `latest` pointing at a
complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .._utils import atomic_path
from ..denoiser import Denoiser
from ..nn.unet import UNet, UNetConfig
from ..schedules import NoiseSchedule

FORMAT = "diffusekit-checkpoint"
VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_fsynced(path: Path, write) -> None:
    write(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, step: int, config: dict, ema_state: dict, train_state: dict | None,
                    keep: int = 2, extra: dict[str, dict] | None = None) -> Path:
    """Write checkpoint `step` under run_dir atomically, point `latest` at it, keep the newest `keep`.
    `extra` maps further safetensors file names to state dicts (a latent model's autoencoder)."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_fsynced(tmp / "config.json", lambda p: p.write_text(json.dumps({**config, "step": step}, indent=2)))
    weights = {k: v.detach().to("cpu").contiguous() for k, v in ema_state.items()}
    _write_fsynced(tmp / "model.safetensors", lambda p: save_file(weights, str(p), metadata={"format": FORMAT}))
    for filename, state in (extra or {}).items():
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        _write_fsynced(tmp / filename, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    if train_state is not None:
        _write_fsynced(tmp / "train_state.pt", lambda p: torch.save(train_state, p))
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. right after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    with atomic_path(run_dir / "latest") as p:
        p.write_text(f"checkpoints/{name}\n")
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder, or a run folder (whose `latest` names its newest checkpoint)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        target = path / latest.read_text().strip()
        if (target / "config.json").is_file():
            return target
        raise ValueError(f"{latest} points at {target}, which is not a complete checkpoint")
    if not path.exists():
        raise ValueError(f"no such run or checkpoint folder: {path}")
    raise ValueError(f"{path} holds no diffusekit checkpoint (no config.json, no 'latest'); train into it first")


def read_config(path) -> dict:
    folder = resolve_checkpoint(path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / 'config.json'} is not valid JSON ({e})") from None
    if config.get("format") != FORMAT:
        raise ValueError(f"{folder} is not a diffusekit checkpoint (config.json format is {config.get('format')!r})")
    if config.get("version", 0) > VERSION:
        raise ValueError(f"{folder} was written by a newer diffusekit (format version {config['version']}); upgrade")
    return config


def schedule_from_config(spec: dict) -> NoiseSchedule:
    return NoiseSchedule.from_name(spec["name"], spec.get("num_steps", 1000),
                                   zero_terminal_snr=spec.get("zero_terminal_snr", False))


def read_weights(path: Path) -> dict:
    """A safetensors file, with a one-line error if it is truncated or not safetensors at all."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise ValueError(f"{path} is missing; the checkpoint is incomplete") from None
    except Exception as e:  # safetensors raises its own error type for corrupt headers
        raise ValueError(f"cannot read weights {path} ({e}); the file is corrupt, use another checkpoint") from None


def load_state_strict(module: torch.nn.Module, state: dict, source, assign: bool = False) -> None:
    """Load `state` into `module`, naming the first missing / unexpected / mis-shaped key. With
    `assign` the tensors are taken over rather than copied (for modules built on the meta device:
    no random initialisation, no second copy of the weights in memory)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source} does not fit this model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    module.load_state_dict(state, assign=assign)


@dataclass
class Model:
    """A trained model rebuilt from its checkpoint folder alone."""

    network: UNet
    schedule: NoiseSchedule
    prediction: str
    config: dict
    path: Path
    text_encoder: torch.nn.Module | None = None
    autoencoder: torch.nn.Module | None = None  # latent models: decodes what the sampler returns

    @property
    def denoiser(self) -> Denoiser:
        return Denoiser(self.network, self.schedule, self.prediction)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        data = self.config["data"]
        return data["channels"], data["resolution"], data["resolution"]

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """What the sampler draws: the image shape, or for latent models the latent shape."""
        if self.autoencoder is None:
            return self.image_shape
        return tuple(self.config["autoencoder"]["latent_shape"])

    @property
    def sample_clip(self) -> tuple[float, float] | None:
        """The range denoised estimates are clamped to while sampling: pixels lie in [-1, 1],
        unit-std latents have no hard bound."""
        return (-1.0, 1.0) if self.autoencoder is None else None

    def decode(self, x, check_scale: bool = True):
        """Sampler output -> images: identity for pixel models; latent models decode through their
        autoencoder (latents of the wrong shape or, with check_scale, far from unit std are refused)."""
        if self.autoencoder is None:
            return x
        from .latent import decode_latents

        return decode_latents(self.autoencoder, x, self.sample_shape, check_scale=check_scale)

    def encode(self, images, generator=None):
        """Images [B, C, H, W] in [-1, 1] -> what the sampler works on (scaled latents for latent models)."""
        if self.autoencoder is None:
            return images
        with torch.no_grad():
            return self.autoencoder.encode_latents(images, generator=generator, sample=generator is not None)

    @property
    def conditioning_kind(self) -> str | None:
        """"class", "text" or None (unconditional)."""
        return self.config.get("conditioning")

    def conditioning(self, n: int, *, class_labels=None, prompts=None, negative_prompt: str | None = None,
                     device="cpu") -> tuple[dict | None, dict | None]:
        """(cond, uncond) for n samples: `class_labels` (an int or n ints; None = unconditional) for
        class models, `prompts` (a string or a list, cycled over the n samples; "" = unconditional)
        and an optional negative prompt for text models."""
        kind = self.conditioning_kind
        if kind is None:
            if class_labels is not None or prompts is not None:
                raise ValueError(f"{self.path} is an unconditional model: it takes no class or prompt")
            return None, None
        if kind == "class":
            if prompts is not None or negative_prompt is not None:
                raise ValueError(f"{self.path} is a class-conditional model: give a class, not a prompt")
            classes = self.config["data"]["num_classes"]
            labels = torch.full((n,), classes, dtype=torch.long) if class_labels is None else \
                torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).repeat(n)[:n]
            bad = labels[(labels < 0) | (labels >= classes)]
            if class_labels is not None and len(bad):
                raise ValueError(f"class {int(bad[0])} is out of range: this model knows classes 0..{classes - 1}")
            return {"class_labels": labels.to(device)}, {"class_labels": torch.full((1,), classes, device=device)}
        if class_labels is not None:
            raise ValueError(f"{self.path} is a text-conditional model: give a prompt, not a class")
        prompts = [""] if prompts is None else ([prompts] if isinstance(prompts, str) else list(prompts))
        if not prompts:
            raise ValueError("no prompts given")
        prompts = [prompts[i % len(prompts)] for i in range(n)]
        pooled = self.network.config.pooled_context_dim is not None
        cond = self.text_encoder(prompts).cond(pooled)
        uncond = self.text_encoder([negative_prompt or ""]).cond(pooled)
        return ({k: v.to(device) for k, v in cond.items()}, {k: v.to(device) for k, v in uncond.items()})


def load(path, device="cpu") -> Model:
    """Rebuild the network (EMA weights), schedule and parameterisation from a checkpoint or run folder."""
    folder = resolve_checkpoint(path)
    config = read_config(folder)
    if config.get("model", {}).get("type") == "autoencoder":
        raise ValueError(f"{folder} is an autoencoder, not a diffusion model: train one on its latents with "
                         f"`diffusekit train --autoencoder {path}`")
    if config.get("model", {}).get("type") != "unet":
        raise ValueError(f"{folder}: unknown model type {config.get('model', {}).get('type')!r}")
    network = UNet(UNetConfig.from_dict(config["model"]["config"]))
    text_encoder = None
    if config.get("text_encoder"):
        from ..nn.text import LearnedEncoder, build_text_encoder

        text_encoder = build_text_encoder(config["text_encoder"])
        if isinstance(text_encoder, LearnedEncoder):  # trained with the U-Net, saved as text_encoder.*
            network.add_module("text_encoder", text_encoder)
        text_encoder.to(device).eval()
    load_state_strict(network, read_weights(folder / "model.safetensors"), folder / "model.safetensors")
    network.to(device).eval().requires_grad_(False)
    autoencoder = None
    if config.get("autoencoder"):  # a latent model: its autoencoder is embedded in the checkpoint
        from .latent import load_autoencoder

        autoencoder, _ = load_autoencoder(folder, device)
    return Model(network, schedule_from_config(config["schedule"]), config["prediction"], config, folder, text_encoder,
                 autoencoder)
