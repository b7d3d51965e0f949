"""Thin compositions of schedule -> sampler -> decoder."""

from .generate import generate

__all__ = ["generate"]
