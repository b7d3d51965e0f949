"""Thin compositions of schedule -> sampler -> decoder."""

from .edit import img2img, inpaint
from .generate import generate

__all__ = ["generate", "img2img", "inpaint"]
