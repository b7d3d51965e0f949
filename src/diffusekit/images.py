"""Image I/O between PIL and [-1, 1] tensors, with clear errors and atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ._utils import atomic_path


def load_image(path, mode: str = "RGB") -> Image.Image:
    """Open an image fully (so corruption shows here, not later) in `mode` ("RGB" or "L")."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode)
    except FileNotFoundError:
        raise ValueError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path} ({e}); give a valid PNG, JPEG or WebP file") from None


def pil_to_tensor(image: Image.Image) -> Tensor:
    """PIL -> float32 [C, H, W] in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def tensor_to_pil(x: Tensor) -> Image.Image:
    """[C, H, W] in [-1, 1] (values outside are clipped) -> PIL, grey for C = 1."""
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected an image tensor [1 or 3, H, W], got shape {tuple(x.shape)}")
    array = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = array.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else array, "L" if array.shape[2] == 1 else "RGB")


def save_image(image: Image.Image, path) -> Path:
    """Write atomically: readers see the old file or the complete new one, never a partial one."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the image format from {path.name!r}; use a .png, .jpg or .webp name")
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt)
    return path
