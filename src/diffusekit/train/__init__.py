"""Training: the loop, EMA, checkpoints and resume, distributed data parallel."""

from .autoencoder import AutoencoderTrainConfig, train_autoencoder
from .checkpoint import Model, load
from .latent import load_autoencoder
from .loop import TrainConfig, train

__all__ = ["AutoencoderTrainConfig", "Model", "TrainConfig", "load", "load_autoencoder", "train", "train_autoencoder"]
