"""Datasets. The embedded default is scikit-learn's handwritten digits (ships with the package)."""

from .digits import load_digits

__all__ = ["load_digits"]
