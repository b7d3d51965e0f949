"""Training: the loop, EMA, checkpoints and resume, distributed data parallel."""

from .checkpoint import Model, load
from .loop import TrainConfig, train

__all__ = ["Model", "TrainConfig", "load", "train"]
