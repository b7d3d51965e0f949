"""VAE state dicts and configs from diffusers folders and Stable Diffusion single files -> `AutoencoderKL`.

Our autoencoder uses diffusers' submodule names, so a current diffusers `AutoencoderKL` state dict
loads unchanged. What needs renaming is older: diffusers before 0.14 named the mid-block attention
`query` / `key` / `value` / `proj_attn`, and the original CompVis checkpoints (the VAE inside an SD
`.ckpt` / `.safetensors` under `first_stage_model.`) use their own layout, with 1x1 convolutions
for the attention projections and the decoder levels numbered from the smallest resolution up.
"""

from __future__ import annotations

import re

from torch import Tensor

from ..nn.autoencoder import AutoencoderConfig

_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LDM_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _linear(key: str, value: Tensor) -> Tensor:
    """A 1x1 conv (or conv1d) weight [C, C, 1(, 1)] as the Linear weight [C, C] it equals on tokens
    (norms and biases are 1-D and pass through)."""
    if key.endswith(".weight") and value.ndim > 2:
        return value.reshape(value.shape[0], value.shape[1])
    return value


def autoencoder_state_from_diffusers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers `AutoencoderKL` state dict (current or pre-0.14 attention names) for
    `diffusekit.nn.AutoencoderKL`."""
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"(.*\.mid_block\.attentions\.\d+)\.(\w+)\.(weight|bias)", key)
        if m and m.group(2) in _LEGACY_ATTENTION:
            key = f"{m.group(1)}.{_LEGACY_ATTENTION[m.group(2)]}.{m.group(3)}"
        out[key] = _linear(key, value) if ".attentions." in key else value
    return out


def autoencoder_state_from_ldm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an original (CompVis / single-file SD) VAE state dict for `diffusekit.nn.AutoencoderKL`.

    Takes a bare VAE state or a whole SD checkpoint (the keys under `first_stage_model.` or `vae.`;
    everything else, such as the U-Net or a training loss's discriminator, is left out)."""
    for prefix in ("first_stage_model.", "vae."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    ups = {int(m.group(1)) for k in state if (m := re.match(r"decoder\.up\.(\d+)\.", k))}
    levels = max(ups) + 1 if ups else 0
    out = {}
    for key, value in state.items():
        if not key.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")):
            continue
        new = key.replace(".norm_out.", ".conv_norm_out.").replace(".nin_shortcut.", ".conv_shortcut.")
        new = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", new)
        new = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", new)
        m = re.fullmatch(r"decoder\.up\.(\d+)\.(block|upsample)\.(.+)", new)
        if m:  # CompVis numbers decoder levels from the smallest resolution; diffusers (and we) in execution order
            sub = "resnets" if m.group(2) == "block" else "upsamplers.0"
            new = f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.{sub}.{m.group(3)}"
        new = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}.", new)
        m = re.fullmatch(r"(\w+)\.mid\.attn_1\.(\w+)\.(weight|bias)", new)
        if m:
            new = f"{m.group(1)}.mid_block.attentions.0.{_LDM_ATTENTION[m.group(2)]}.{m.group(3)}"
            value = _linear(new, value)
        out[new] = value
    return out


def autoencoder_config_from_diffusers(config: dict) -> AutoencoderConfig:
    """An `AutoencoderConfig` from a diffusers `AutoencoderKL` config.json dict; raises on options
    this architecture does not express rather than loading weights into the wrong network."""

    def reject(name, why):
        raise ValueError(f"diffusers AutoencoderKL config {name}: {why}; diffusekit's AutoencoderKL cannot express it")

    for name, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(t != allowed for t in config.get(name, ())):
            reject(name, f"only {allowed} blocks are supported, got {config[name]}")
    if config.get("act_fn", "silu") not in ("silu", "swish"):
        reject("act_fn", f"{config['act_fn']!r} is not silu")
    quant, post_quant = config.get("use_quant_conv", True), config.get("use_post_quant_conv", True)
    if quant != post_quant:
        reject("use_quant_conv", f"use_quant_conv={quant} with use_post_quant_conv={post_quant}")
    if config.get("latents_mean") is not None or config.get("latents_std") is not None:
        reject("latents_mean", "per-channel latent statistics are not supported (use scaling_factor / shift_factor)")
    return AutoencoderConfig(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        latent_channels=config.get("latent_channels", 4),
        block_out_channels=tuple(config.get("block_out_channels", (64,))),
        layers_per_block=config.get("layers_per_block", 1),
        norm_groups=config.get("norm_num_groups", 32),
        mid_attention=config.get("mid_block_add_attention", True),
        use_quant_conv=quant,
        scaling_factor=config.get("scaling_factor", 0.18215),
        shift_factor=config.get("shift_factor") or 0.0,
    )
