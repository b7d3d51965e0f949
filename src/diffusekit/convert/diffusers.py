"""diffusers' U-Net state dicts -> diffusekit's `UNet`.

Our U-Net uses diffusers' submodule names (`down_blocks.0.resnets.1.conv1`, `transformer_blocks`,
`to_q`, ...), so `UNet2DConditionModel` weights (Stable Diffusion) load unchanged. `UNet2DModel`'s
DDPM self-attention keeps its q/k/v/out projections beside the GroupNorm, where ours nests them in
an `attention` submodule: that is the one renaming.
"""

from __future__ import annotations

from torch import Tensor


def unet_state_from_diffusers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers `UNet2DModel` / `UNet2DConditionModel` state dict for `diffusekit.nn.UNet`."""
    out = {}
    for key, value in state.items():
        if ".attentions." in key and ".transformer_blocks." not in key:
            head, tail = key.split(".attentions.", 1)
            index, rest = tail.split(".", 1)
            if rest.startswith(("to_q.", "to_k.", "to_v.", "to_out.")):  # a DDPM attention block
                key = f"{head}.attentions.{index}.attention.{rest}"
        out[key] = value
    return out
