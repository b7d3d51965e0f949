"""Key maps from other libraries' checkpoints to diffusekit's modules."""

from .diffusers import unet_state_from_diffusers

__all__ = ["unet_state_from_diffusers"]
