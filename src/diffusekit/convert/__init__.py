"""Key maps from other libraries' checkpoints to diffusekit's modules."""

from .autoencoder import autoencoder_config_from_diffusers, autoencoder_state_from_diffusers, autoencoder_state_from_ldm
from .diffusers import unet_state_from_diffusers

__all__ = ["autoencoder_config_from_diffusers", "autoencoder_state_from_diffusers", "autoencoder_state_from_ldm",
           "unet_state_from_diffusers"]
