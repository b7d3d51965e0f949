"""Networks: the U-Net, the KL autoencoder, text encoders."""

from .autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from .autoencoder import preset as autoencoder_preset
from .unet import UNet, UNetConfig, preset

__all__ = ["AutoencoderConfig", "AutoencoderKL", "DiagonalGaussian", "UNet", "UNetConfig", "autoencoder_preset",
           "preset"]
