"""scikit-learn's 1,797 8x8 grey handwritten digits, scaled to [-1, 1]."""

from __future__ import annotations

import torch
from torch import Tensor


def load_digits() -> tuple[Tensor, Tensor]:
    """Images [1797, 1, 8, 8] in [-1, 1] (float32) and labels [1797] (int64)."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1
    return images, torch.as_tensor(digits.target, dtype=torch.int64)
