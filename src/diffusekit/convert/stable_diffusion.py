"""Stable Diffusion checkpoints <-> diffusekit's U-Net, autoencoder and a `transformers` CLIP text model.

Two layouts exist in the wild:

* diffusers folders: `model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
  `scheduler/`. Our U-Net and autoencoder use diffusers' submodule names, so their weights load by
  name; what needs translating is the config.json files (`unet_config_from_diffusers`, ...).
* single files from the original Latent Diffusion code (`.safetensors`, or `.ckpt` read with
  `weights_only=True`): the U-Net under `model.diffusion_model.` in the openaimodel layout
  (`input_blocks.4.1.transformer_blocks.0...`), the VAE under `first_stage_model.`, the text
  encoder under `cond_stage_model.` (a `transformers` CLIP for SD 1.x, OpenCLIP for SD 2.x). They
  carry no config, so the architecture is read from the tensors' names and shapes
  (`detect_family`); what shapes cannot tell (SD 1.x's 8 heads against SD 2.x's 64-channel heads,
  eps against v prediction) follows the family, overridable by the caller.

The LDM U-Net names are a pure function of the architecture: `ldm_unet_names(config)` lists, for
every key of our U-Net, its LDM name. That one table converts in both directions.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..nn.autoencoder import AutoencoderConfig, AutoencoderKL
from ..nn.unet import UNet, UNetConfig
from ..schedules import NoiseSchedule
from ..train.checkpoint import load_state_strict, read_weights

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_TEXT_PREFIX = "cond_stage_model."

# ---------------------------------------------------------------------------------------------
# diffusers configs
# ---------------------------------------------------------------------------------------------

# UNet2DConditionModel options whose value must be the default for our U-Net to compute the same function
_UNET_FIXED = {
    "center_input_sample": False, "only_cross_attention": False, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "encoder_hid_dim": None, "dual_cross_attention": False,
    "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "reverse_transformer_layers_per_block": None, "dropout": 0.0,
}


def _uniform(name: str, value, levels: int):
    """A per-level diffusers option as one value, or a tuple when it varies."""
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"diffusers U-Net config {name}: {len(value)} values for {levels} levels")
        return tuple(value) if len(set(value)) > 1 else value[0]
    return value


def unet_config_from_diffusers(config: dict) -> UNetConfig:
    """A `UNetConfig` from a diffusers `UNet2DConditionModel` config.json dict. Options our U-Net
    does not express raise (naming the option) rather than loading weights into the wrong network.

    diffusers' `attention_head_dim` is, for Stable Diffusion, the number of heads (a historical
    misnomer that diffusers keeps); `num_attention_heads` overrides it when set."""

    def reject(name, why):
        raise ValueError(f"diffusers U-Net config {name}: {why}; diffusekit's U-Net cannot express it")

    for name, default in _UNET_FIXED.items():
        value = config.get(name, default)
        if value != default and not (default is None and value is False):  # False is "off" like None
            reject(name, f"{value!r} (only {default!r} is supported)")
    down, up = list(config.get("down_block_types", ())), list(config.get("up_block_types", ()))
    channels = tuple(config["block_out_channels"])
    levels = len(channels)
    if len(down) != levels or len(up) != levels:
        reject("down_block_types", f"{len(down)} down and {len(up)} up blocks for {levels} channel counts")
    for i, kind in enumerate(down):
        if kind not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            reject("down_block_types", f"block type {kind!r}")
        mirrored = up[levels - 1 - i]
        if mirrored != kind.replace("Down", "Up"):
            reject("up_block_types", f"{mirrored!r} does not mirror down block {i} ({kind!r})")
    image_size = config.get("sample_size") or 64
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            reject("sample_size", f"non-square {image_size}")
        image_size = image_size[0]
    pyramid = [image_size // 2**i for i in range(levels)]
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    depth = _uniform("transformer_layers_per_block", config.get("transformer_layers_per_block", 1), levels)
    if isinstance(depth, tuple):
        reject("transformer_layers_per_block", f"per-level depths {depth}")
    in_channels, out_channels = config.get("in_channels", 4), config.get("out_channels", 4)
    return UNetConfig(
        in_channels=out_channels if in_channels > out_channels else in_channels,
        out_channels=out_channels,
        # the inpainting U-Net's extra inputs (mask, masked-image latents) are our concat channels
        concat_channels=max(0, in_channels - out_channels),
        image_size=image_size,
        block_out_channels=channels,
        layers_per_block=config.get("layers_per_block", 2),
        attention_resolutions=tuple(pyramid[i] for i, kind in enumerate(down) if kind.startswith("CrossAttn")),
        mid_attention=True,
        attention_type="transformer",
        num_heads=_uniform("attention_head_dim", heads, levels),
        head_dim=None,
        transformer_depth=depth,
        context_dim=config.get("cross_attention_dim", 1280),
        use_linear_projection=config.get("use_linear_projection", False),
        norm_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5),
        flip_sin_to_cos=config.get("flip_sin_to_cos", True),
        freq_shift=config.get("freq_shift", 0),
    )


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    """The diffusers `UNet2DConditionModel` config.json for a Stable-Diffusion-layout `UNetConfig`."""

    def reject(name, why):
        raise ValueError(f"UNetConfig.{name}: {why}; only the Stable Diffusion layout saves in the diffusers format")

    if cfg.attention_type != "transformer" or cfg.context_dim is None:
        reject("attention_type", "needs cross-attention transformer blocks (attention_type='transformer', context_dim)")
    for name, default in (("patch_size", 1), ("num_classes", None), ("pooled_context_dim", None),
                          ("time_scale_shift", False), ("resample", "conv"), ("mid_attention", True),
                          ("augmentation_embedding", False)):
        if getattr(cfg, name) != default:
            reject(name, f"{getattr(cfg, name)!r} is not {default!r}")
    pyramid = cfg.pyramid()
    down = ["CrossAttnDownBlock2D" if r in cfg.attention_resolutions else "DownBlock2D" for r in pyramid]
    heads = [cfg.heads_at(i) for i in range(len(pyramid))]
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels + cfg.concat_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": down,
        "up_block_types": [kind.replace("Down", "Up") for kind in reversed(down)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
        "transformer_layers_per_block": cfg.transformer_depth,
        "cross_attention_dim": cfg.context_dim,
        "use_linear_projection": cfg.use_linear_projection,
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": cfg.norm_eps,
        "flip_sin_to_cos": cfg.flip_sin_to_cos,
        "freq_shift": cfg.freq_shift,
        "act_fn": "silu",
        "downsample_padding": 1,
        "center_input_sample": False,
    }


@dataclass(frozen=True)
class SchedulerSettings:
    """What a diffusers scheduler_config.json says about the model (the sampler is the caller's choice)."""

    schedule: NoiseSchedule
    prediction: str  # eps | v | x0
    spacing: str  # leading | trailing | linspace
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: float | None = None  # DDIM/DDPM schedulers' clamp of the x0 estimate, when switched on
    config: dict | None = None  # the original dict, written back on save

    def to_diffusers(self) -> dict:
        if self.config is not None:
            return dict(self.config)
        betas = self.schedule.name.split("+")[0]
        return {
            "_class_name": "DDIMScheduler", "num_train_timesteps": self.schedule.num_steps,
            "beta_schedule": {"cosine": "squaredcos_cap_v2"}.get(betas, betas),
            "beta_start": 0.00085, "beta_end": 0.012,
            "prediction_type": {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[self.prediction],
            "timestep_spacing": self.spacing, "steps_offset": self.steps_offset,
            "set_alpha_to_one": self.set_alpha_to_one, "clip_sample": False,
            "rescale_betas_zero_snr": "zero_terminal_snr" in self.schedule.name,
        }


_BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def scheduler_from_diffusers(config: dict) -> SchedulerSettings:
    """Noise schedule, parameterisation and timestep spacing from a diffusers scheduler config."""
    kind = config.get("beta_schedule", "linear")
    steps = int(config.get("num_train_timesteps", 1000))
    zero_snr = bool(config.get("rescale_betas_zero_snr", False))
    if config.get("trained_betas") is not None:
        schedule = NoiseSchedule.from_betas(config["trained_betas"], name="trained")
    elif kind in _BETA_SCHEDULES:
        kwargs = {} if kind == "squaredcos_cap_v2" else {
            "beta_start": config.get("beta_start", 0.0001), "beta_end": config.get("beta_end", 0.02)}
        schedule = NoiseSchedule.from_name(_BETA_SCHEDULES[kind], steps, zero_terminal_snr=zero_snr, **kwargs)
    else:
        raise ValueError(f"scheduler config beta_schedule {kind!r}: valid are {', '.join(_BETA_SCHEDULES)}")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in _PREDICTIONS:
        raise ValueError(f"scheduler config prediction_type {prediction!r}: valid are {', '.join(_PREDICTIONS)}")
    spacing = config.get("timestep_spacing", "leading")
    if spacing not in ("leading", "trailing", "linspace"):
        raise ValueError(f"scheduler config timestep_spacing {spacing!r}: valid are leading, trailing, linspace")
    # only DDIM and DDPM schedulers clamp x0 (their default is on; Stable Diffusion's configs switch it off)
    clips = config.get("_class_name") in ("DDIMScheduler", "DDPMScheduler") and config.get("clip_sample", True)
    return SchedulerSettings(schedule, _PREDICTIONS[prediction], spacing, int(config.get("steps_offset", 0)),
                             bool(config.get("set_alpha_to_one", True)),
                             float(config.get("clip_sample_range", 1.0)) if clips else None, dict(config))


def stable_diffusion_scheduler(prediction: str = "eps") -> SchedulerSettings:
    """The schedule every Stable Diffusion 1.x/2.x model was trained with (what a single file implies)."""
    return scheduler_from_diffusers({
        "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1, "set_alpha_to_one": False,
        "skip_prk_steps": True, "timestep_spacing": "leading",
        "prediction_type": {"eps": "epsilon", "v": "v_prediction"}[prediction]})


def autoencoder_config_to_diffusers(cfg: AutoencoderConfig) -> dict:
    levels = len(cfg.block_out_channels)
    return {
        "_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "latent_channels": cfg.latent_channels, "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block, "norm_num_groups": cfg.norm_groups, "act_fn": "silu",
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "mid_block_add_attention": cfg.mid_attention, "use_quant_conv": cfg.use_quant_conv,
        "use_post_quant_conv": cfg.use_quant_conv, "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor or None,
    }


# ---------------------------------------------------------------------------------------------
# The original (LDM) U-Net layout
# ---------------------------------------------------------------------------------------------

_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def ldm_unet_names(config: UNetConfig) -> dict[str, str]:
    """{our U-Net key: its name in an original Stable Diffusion checkpoint (without the
    `model.diffusion_model.` prefix)} for every parameter of `UNet(config)`.

    The openaimodel numbers blocks in one flat list per path: input block 0 is conv_in, then each
    level's (ResBlock [, attention]) layers and its downsampler; output blocks hold a ResBlock,
    the attention if the level has it, and the level's upsampler in the last layer."""
    per_level = config.layers_per_block + 1
    names = {}
    with torch.device("meta"):
        keys = list(UNet(config).state_dict())
    for key in keys:
        parts = key.split(".")
        if parts[0] == "time_embedding":
            new = f"time_embed.{0 if parts[1] == 'linear_1' else 2}.{parts[2]}"
        elif parts[0] == "conv_in":
            new = f"input_blocks.0.0.{parts[1]}"
        elif parts[0] == "conv_norm_out":
            new = f"out.0.{parts[1]}"
        elif parts[0] == "conv_out":
            new = f"out.2.{parts[1]}"
        elif parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), parts[3:]
            slot = 1 if kind == "attentions" else (0 if index == 0 else (2 if config.mid_attention else 1))
            new = f"middle_block.{slot}." + _ldm_inner(kind, rest)
        elif parts[0] in ("down_blocks", "up_blocks"):
            level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if parts[0] == "down_blocks":
                if kind == "downsamplers":
                    new = f"input_blocks.{(level + 1) * per_level}.0.op.{rest[-1]}"
                else:
                    block = 1 + level * per_level + index
                    new = f"input_blocks.{block}.{1 if kind == 'attentions' else 0}." + _ldm_inner(kind, rest)
            else:
                block = level * per_level + (per_level - 1 if kind == "upsamplers" else index)
                if kind == "upsamplers":
                    has_attention = config.pyramid()[len(config.block_out_channels) - 1 - level] in config.attention_resolutions
                    new = f"output_blocks.{block}.{2 if has_attention else 1}.conv.{rest[-1]}"
                else:
                    new = f"output_blocks.{block}.{1 if kind == 'attentions' else 0}." + _ldm_inner(kind, rest)
        else:
            raise ValueError(f"no LDM name for U-Net key {key!r}")
        names[key] = new
    return names


def _ldm_inner(kind: str, rest: list[str]) -> str:
    """Names inside a block: ResBlock parts are renamed; transformer internals are the same in both."""
    if kind == "resnets":
        return f"{_LDM_RESNET[rest[0]]}.{'.'.join(rest[1:])}"
    return ".".join(rest)


def unet_state_from_ldm(state: dict[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """Our U-Net state from a single-file checkpoint (its `model.diffusion_model.` keys)."""
    unet = {k[len(LDM_UNET_PREFIX):]: v for k, v in state.items() if k.startswith(LDM_UNET_PREFIX)}
    names = ldm_unet_names(config)
    missing = [ldm for ldm in names.values() if ldm not in unet]
    if missing:
        raise ValueError(f"single-file checkpoint lacks U-Net key {LDM_UNET_PREFIX}{missing[0]} "
                         f"({len(missing)} missing): not the architecture its other tensors describe")
    unknown = sorted(set(unet) - set(names.values()))
    if unknown:
        raise ValueError(f"single-file checkpoint has an unknown U-Net key {LDM_UNET_PREFIX}{unknown[0]} "
                         f"({len(unknown)} unknown): a model family diffusekit does not load")
    return {ours: unet[ldm] for ours, ldm in names.items()}


def unet_state_to_ldm(state: dict[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """The inverse of `unet_state_from_ldm`, prefix included."""
    return {LDM_UNET_PREFIX + ldm: state[ours] for ours, ldm in ldm_unet_names(config).items()}


# ---------------------------------------------------------------------------------------------
# Reading the architecture from a single file
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """What a single file's tensors say: `name` is sd1, sd2 (or their -inpainting variants)."""

    name: str
    unet: UNetConfig
    autoencoder: AutoencoderConfig
    text_layout: str  # "clip" (transformers names) or "open_clip"
    prediction: str


def _count(state: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def detect_family(state: dict[str, Tensor], *, prediction: str | None = None, image_size: int | None = None) -> Family:
    """The model family and configs from a single-file Stable Diffusion state dict.

    SD 1.x has 768-wide text states, 8 heads per attention and predicts eps; SD 2.x has 1024-wide
    OpenCLIP states, 64-channel heads, linear transformer projections, and (the 768x768 models)
    predicts v; its 512x512 "base" and inpainting models predict eps: pass `prediction="eps"`, as
    nothing in the weights tells them apart. A 9-channel first convolution is an inpainting U-Net."""
    if any(k.startswith(("conditioner.embedders.", "model.diffusion_model.label_emb.")) for k in state):
        raise ValueError("this is an SDXL-family checkpoint (conditioner.embedders / label_emb keys); "
                         "diffusekit loads Stable Diffusion 1.x and 2.x")
    p = LDM_UNET_PREFIX
    if f"{p}input_blocks.0.0.weight" not in state:
        raise ValueError(f"not a Stable Diffusion checkpoint: no {p}input_blocks.0.0.weight key "
                         "(expected the original Latent Diffusion layout)")
    conv_in, conv_out = state[f"{p}input_blocks.0.0.weight"], state[f"{p}out.2.weight"]
    levels = _count(state, rf"{re.escape(p)}input_blocks\.(\d+)\.0\.op\.weight") + 1
    outputs = _count(state, rf"{re.escape(p)}output_blocks\.(\d+)\.")
    if outputs % levels:
        raise ValueError(f"{outputs} output blocks for {levels} levels: an unknown U-Net layout")
    per_level = outputs // levels
    channels = tuple(int(state[f"{p}input_blocks.{1 + level * per_level}.0.out_layers.3.weight"].shape[0])
                     for level in range(levels))
    attention = [f"{p}input_blocks.{1 + level * per_level}.1.proj_in.weight" in state for level in range(levels)]
    first = next((level for level in range(levels) if attention[level]), None)
    if first is None:
        raise ValueError("the U-Net has no cross-attention blocks: not a text-to-image Stable Diffusion model")
    block = f"{p}input_blocks.{1 + first * per_level}.1."
    context_dim = int(state[block + "transformer_blocks.0.attn2.to_k.weight"].shape[1])
    linear = state[block + "proj_in.weight"].ndim == 2
    depth = _count(state, rf"{re.escape(block)}transformer_blocks\.(\d+)\.")
    if context_dim == 768:
        name, heads, text_layout, default_prediction = "sd1", dict(num_heads=8, head_dim=None), "clip", "eps"
    elif context_dim == 1024:
        name, heads, text_layout, default_prediction = "sd2", dict(num_heads=None, head_dim=64), "open_clip", "v"
    else:
        raise ValueError(f"cross-attention width {context_dim}: not Stable Diffusion 1.x (768) or 2.x (1024)")
    in_channels, out_channels = int(conv_in.shape[1]), int(conv_out.shape[0])
    if in_channels == 9:
        name, default_prediction = name + "-inpainting", "eps"
    elif in_channels != out_channels:
        raise ValueError(f"U-Net with {in_channels} input and {out_channels} output channels: an unknown variant")
    prediction = prediction or default_prediction
    if image_size is None:
        image_size = 96 if name == "sd2" and prediction == "v" else 64
    size_pyramid = [image_size // 2**i for i in range(levels)]
    unet = UNetConfig(
        in_channels=out_channels, out_channels=out_channels, concat_channels=in_channels - out_channels,
        image_size=image_size, block_out_channels=channels, layers_per_block=per_level - 1,
        attention_resolutions=tuple(r for r, a in zip(size_pyramid, attention) if a), attention_type="transformer",
        transformer_depth=depth, context_dim=context_dim, use_linear_projection=linear, **heads)
    return Family(name, unet, autoencoder_config_from_ldm(state), text_layout, prediction)


def autoencoder_config_from_ldm(state: dict[str, Tensor]) -> AutoencoderConfig:
    """The VAE's config from its `first_stage_model.` tensors (SD's scaling factor 0.18215)."""
    p = LDM_VAE_PREFIX
    if f"{p}encoder.conv_in.weight" not in state:
        raise ValueError(f"single-file checkpoint has no VAE ({p}encoder.conv_in.weight is missing)")
    levels = _count(state, rf"{re.escape(p)}encoder\.down\.(\d+)\.")
    return AutoencoderConfig(
        in_channels=int(state[f"{p}encoder.conv_in.weight"].shape[1]),
        out_channels=int(state[f"{p}decoder.conv_out.weight"].shape[0]),
        latent_channels=int(state[f"{p}decoder.conv_in.weight"].shape[1]),
        block_out_channels=tuple(int(state[f"{p}encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels)),
        layers_per_block=_count(state, rf"{re.escape(p)}encoder\.down\.0\.block\.(\d+)\."),
        mid_attention=f"{p}encoder.mid.attn_1.q.weight" in state,
        use_quant_conv=f"{p}quant_conv.weight" in state,
        scaling_factor=0.18215,
    )


# ---------------------------------------------------------------------------------------------
# The text encoder inside a single file
# ---------------------------------------------------------------------------------------------

_OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def text_state_from_ldm(state: dict[str, Tensor], layout: str) -> tuple[dict[str, Tensor], dict]:
    """(a `transformers` CLIPTextModel state dict, CLIPTextConfig keyword arguments) from a single
    file's `cond_stage_model.` tensors.

    SD 1.x stores a transformers CLIP (`cond_stage_model.transformer.text_model.*`). SD 2.x stores
    OpenCLIP ViT-H and conditions on its penultimate layer; as in diffusers' SD 2 folders, that is
    a CLIP text model with the last layer dropped (its final layer norm then acts on the
    penultimate layer's output), with the fused q/k/v projection split in three."""
    if layout == "clip":
        prefix = LDM_TEXT_PREFIX + "transformer."
        text = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        text = {k.removeprefix("text_model."): v for k, v in text.items() if not k.endswith("position_ids")}
        hidden_act = "quick_gelu"
    else:
        prefix = LDM_TEXT_PREFIX + "model."
        src = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not src:
            raise ValueError(f"single-file checkpoint has no text encoder ({prefix}* keys are missing)")
        layers = _count(src, r"transformer\.resblocks\.(\d+)\.") - 1  # the penultimate layer's output
        text = {"embeddings.token_embedding.weight": src["token_embedding.weight"],
                "embeddings.position_embedding.weight": src["positional_embedding"],
                "final_layer_norm.weight": src["ln_final.weight"], "final_layer_norm.bias": src["ln_final.bias"]}
        for i in range(layers):
            block = f"transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                q, k, v = src[f"{block}attn.in_proj_{kind}"].chunk(3)
                for name, value in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    text[f"encoder.layers.{i}.self_attn.{name}.{kind}"] = value
                for theirs, ours in _OPEN_CLIP_LAYER.items():
                    text[f"encoder.layers.{i}.{ours}.{kind}"] = src[f"{block}{theirs}.{kind}"]
        hidden_act = "gelu"
    if "embeddings.token_embedding.weight" not in text:
        raise ValueError(f"single-file checkpoint has no text encoder ({LDM_TEXT_PREFIX}* keys are missing)")
    vocab, hidden = text["embeddings.token_embedding.weight"].shape
    config = dict(
        vocab_size=int(vocab), hidden_size=int(hidden),
        intermediate_size=int(text["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=_count(text, r"encoder\.layers\.(\d+)\."),
        num_attention_heads=max(1, int(hidden) // 64),  # CLIP text models use 64-channel heads
        max_position_embeddings=int(text["embeddings.position_embedding.weight"].shape[0]),
        hidden_act=hidden_act, projection_dim=int(hidden),
    )
    return text, config


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def read_component_weights(folder: Path, variant: str | None = None) -> dict[str, Tensor]:
    """A diffusers component's weights: one safetensors file, a sharded one (index.json), or a
    legacy .bin read with weights_only=True; `variant` picks e.g. diffusion_pytorch_model.fp16.safetensors."""
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    single = folder / f"{stem}.safetensors"
    if single.exists():
        return read_state(single)
    index = folder / f"{stem}.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(read_state(folder / shard))
        return state
    legacy = folder / f"{stem}.bin"
    if legacy.exists():
        return read_state(legacy)
    raise ValueError(f"{folder} holds no weights ({stem}.safetensors, its .index.json or .bin)")


def module_with_weights(cls, config, state: dict[str, Tensor], source):
    """`cls(config)` holding `state`, built on the meta device: a 860M-parameter U-Net is neither
    randomly initialised first nor held twice in memory."""
    with torch.device("meta"):
        module = cls(config)
    load_state_strict(module, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, source,
                      assign=True)
    return module


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: not a complete diffusers Stable Diffusion folder") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def diffusers_autoencoder(folder, variant: str | None = None) -> AutoencoderKL:
    """A diffusers `AutoencoderKL` folder (config.json + weights) as diffusekit's AutoencoderKL."""
    from ..convert.autoencoder import autoencoder_config_from_diffusers, autoencoder_state_from_diffusers

    folder = Path(folder)
    return module_with_weights(AutoencoderKL, autoencoder_config_from_diffusers(read_json(folder / "config.json")),
                               autoencoder_state_from_diffusers(read_component_weights(folder, variant)), folder)



def read_state(path) -> dict[str, Tensor]:
    """Tensors from a .safetensors file, or from a .ckpt/.pt/.bin read with `weights_only=True`
    (never a full unpickle); a checkpoint's `state_dict` entry is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return read_weights(path)
    if path.suffix not in (".ckpt", ".pt", ".pth", ".bin"):
        raise ValueError(f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors or .ckpt")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} cannot be read safely with torch.load(weights_only=True) ({str(e).splitlines()[0]}); "
                         "convert it to .safetensors with a tool you trust") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return data
