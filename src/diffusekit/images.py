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


def image_grid(images: Tensor, columns: int | None = None, padding: int = 2, min_tile: int = 32) -> Image.Image:
    """[N, C, H, W] in [-1, 1] -> one PIL grid (tiles nearest-upscaled to at least `min_tile` px)."""
    if images.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    columns = columns or max(1, int(np.ceil(np.sqrt(n))))
    rows = int(np.ceil(n / columns))
    scale = max(1, int(np.ceil(min_tile / min(h, w))))
    tiles = [tensor_to_pil(img).convert("RGB").resize((w * scale, h * scale), Image.NEAREST) for img in images]
    tw, th = w * scale, h * scale
    grid = Image.new("RGB", (columns * (tw + padding) + padding, rows * (th + padding) + padding), "white")
    for i, tile in enumerate(tiles):
        grid.paste(tile, (padding + (i % columns) * (tw + padding), padding + (i // columns) * (th + padding)))
    return grid


def line_plot(xs, ys, *, title: str = "", size=(640, 360), log_y: bool = True) -> Image.Image:
    """A minimal line plot (e.g. the training loss curve) drawn with PIL, so no plotting library is needed."""
    from PIL import ImageDraw, ImageFont

    image = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    keep = np.isfinite(ys) & (ys > 0 if log_y else np.isfinite(ys))
    xs, ys = xs[keep], ys[keep]
    left, right, top, bottom = 60, size[0] - 15, 25, size[1] - 30
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 6), title, fill="black", font=font)
    if len(xs) < 2:
        return image
    vals = np.log10(ys) if log_y else ys
    lo, hi = vals.min(), vals.max()
    hi = hi if hi > lo else lo + 1
    px = left + (xs - xs.min()) / max(xs.max() - xs.min(), 1e-12) * (right - left)
    py = bottom - (vals - lo) / (hi - lo) * (bottom - top)
    draw.line(list(zip(px.tolist(), py.tolist())), fill=(31, 119, 180), width=2)
    for frac in (0.0, 0.5, 1.0):
        v = lo + frac * (hi - lo)
        y = bottom - frac * (bottom - top)
        draw.text((4, y - 6), f"{10 ** v if log_y else v:.3g}", fill="black", font=font)
    draw.text((left, bottom + 8), f"{xs.min():.0f}", fill="black", font=font)
    draw.text((right - 40, bottom + 8), f"{xs.max():.0f}", fill="black", font=font)
    return image


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, for images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)
