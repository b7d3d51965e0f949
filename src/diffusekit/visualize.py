"""Pictures for learners: the forward process as a strip of frames."""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .forward import q_sample
from .images import tensor_to_pil
from .schedules import NoiseSchedule


@dataclass(frozen=True)
class Frame:
    t: int  # textbook step: 0 = clean, T = last
    alpha_cumprod: float
    snr: float  # abar / (1 - abar); inf at t = 0
    image: Tensor  # [C, H, W], the VP x_t


def forward_frames(x0: Tensor, schedule: NoiseSchedule, steps, noise: Tensor) -> list[Frame]:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise for each textbook step t in `steps`
    (0 = the clean image, T = the last step). One noise draw is shared by all frames so the strip
    shows the same image fading, not different noise patterns."""
    frames = []
    for t in steps:
        if not 0 <= t <= schedule.num_steps:
            raise ValueError(f"step {t} is outside 0..{schedule.num_steps}")
        if t == 0:
            frames.append(Frame(0, 1.0, math.inf, x0))
            continue
        abar = float(schedule.alphas_cumprod[t - 1])
        x_t = q_sample(schedule, x0[None], t - 1, noise[None])[0]
        frames.append(Frame(t, abar, abar / (1 - abar) if abar < 1 else math.inf, x_t))
    return frames


def strip_image(frames: list[Frame], min_size: int = 64) -> Image.Image:
    """Frames side by side (nearest-neighbour upscaled to at least `min_size` pixels) with the
    step and SNR printed under each."""
    tiles = [tensor_to_pil(f.image) for f in frames]
    w, h = tiles[0].size
    scale = max(1, math.ceil(min_size / min(w, h)))
    tiles = [tile.resize((w * scale, h * scale), Image.NEAREST) for tile in tiles]
    tw, th = tiles[0].size
    gap, label_h = 4, 28
    strip = Image.new("RGB", (len(tiles) * (tw + gap) - gap, th + label_h), "white")
    draw, font = ImageDraw.Draw(strip), ImageFont.load_default()
    for i, (tile, frame) in enumerate(zip(tiles, frames)):
        x = i * (tw + gap)
        strip.paste(tile.convert("RGB"), (x, 0))
        snr = "inf" if math.isinf(frame.snr) else f"{frame.snr:.3g}"
        draw.text((x + 2, th + 2), f"t={frame.t}", fill="black", font=font)
        draw.text((x + 2, th + 15), f"SNR {snr}", fill="black", font=font)
    return strip
