"""Captioned shapes: a synthetic text-to-image set whose prompts can be checked from the pixels.

Each image shows one shape (placed left, right, top, bottom or centre) or two shapes (one left of
or above the other) on black, each with a shape, a colour and a size. Captions come from varied
templates and `parse_caption` reads every one of them back, so a generated image can be scored
against its prompt (`diffusekit.metrics.shapes`).

Item i of seed s is drawn from its own generator `default_rng([seed, split, i])`: the set is
random-access and unbounded, and an item never depends on the length or on other items.

A fixed list of (shape, colour) pairs, `HELDOUT_PAIRS`, never appears in the `train` split and
is all the `heldout` split contains: prompts such as "a yellow circle" test whether a model
composes attributes it has only seen apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# The seven non-black corners of the RGB cube: far apart, easy to name, and each has a channel at
# full intensity, so a pixel's max channel is its coverage whatever the colour.
PALETTE = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
}
COLOURS = tuple(PALETTE)
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
RELATIONS = ("left of", "right of", "above", "below")
SPLITS = ("train", "heldout")

# One pair per shape and no colour twice (5 of 35 pairs, 14%), so every shape and every colour
# is still seen in training, only never together.
HELDOUT_PAIRS = (("circle", "yellow"), ("square", "magenta"), ("triangle", "blue"), ("diamond", "white"), ("cross", "red"))
TRAIN_PAIRS = tuple((s, c) for s in SHAPES for c in COLOURS if (s, c) not in HELDOUT_PAIRS)

# Geometry in fractions of the image side. A shape's diameter is the width of its bounding box
# (all shapes are as wide as their diameter; the triangle is equilateral, so 0.87 as tall).
DIAMETERS = {"small": (0.18, 0.24), "large": (0.34, 0.40)}
SIZE_THRESHOLD = 0.29  # between the two ranges: the analyser's small/large boundary
PAIR_SLOTS = (0.25, 0.75)  # a pair's centres along the relation's axis (both at 0.5 across)
ANCHORS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "centre": (0.5, 0.5)}
JITTER = 0.03  # single shapes: at most 0.042 from the anchor, far from the 0.125 that would confuse them
PAIR_JITTER = (0.02, 0.06)  # along / across the relation axis: pairs keep a gap of at least 0.06
SUPERSAMPLE = 4  # render at 4x and average 4x4 blocks: exact area anti-aliasing
TRIANGLE_HEIGHT = 3**0.5 / 2


@dataclass
class Shape:
    """One shape. `position` is set for a lone shape only (a pair is placed by its relation).
    `centre` (x, y) and `diameter`, in fractions of the image side, pin the exact drawing; they
    are not attributes and do not take part in equality. None attributes mean "unspecified"."""

    shape: str
    colour: str | None = None
    size: str | None = None
    position: str | None = None
    centre: tuple[float, float] | None = field(default=None, compare=False)
    diameter: float | None = field(default=None, compare=False)

    def __post_init__(self):
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, COLOURS),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
        ):
            if value is not None and value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")


@dataclass
class Scene:
    """The attributes of an image: its shapes and, for two shapes, how the first sits relative to
    the second. Stored canonically ("right of" and "below" swap the shapes and become "left of"
    and "above"), so equal scenes compare equal however they were phrased."""

    shapes: list[Shape]
    relation: str | None = None

    def __post_init__(self):
        self.shapes = list(self.shapes)
        if self.relation is None:
            return
        if self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; expected one of {', '.join(RELATIONS)}")
        if len(self.shapes) != 2:
            raise ValueError(f"a relation needs exactly two shapes, got {len(self.shapes)}")
        if any(s.position is not None for s in self.shapes):
            raise ValueError("shapes in a pair have no position of their own; the relation places them")
        if self.relation in ("right of", "below"):
            self.shapes.reverse()
            self.relation = "left of" if self.relation == "right of" else "above"


# -- drawing ---------------------------------------------------------------------------------------


def inside(shape: str, u, v):
    """Whether points at offsets (u, v) from a shape's centre, in units of its diameter (y down),
    lie inside it. Broadcasts, so the analyser can test many candidate placements at once."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 0.25
    if shape == "square":
        return (au <= 0.5) & (av <= 0.5)
    if shape == "diamond":
        return au + av <= 0.5
    if shape == "cross":  # arms a third of the diameter thick
        return ((au <= 0.5) & (av <= 1 / 6)) | ((av <= 0.5) & (au <= 1 / 6))
    if shape == "triangle":  # apex up; its half-width grows from 0 at the top to 0.5 at the base
        depth = (v + TRIANGLE_HEIGHT / 2) / TRIANGLE_HEIGHT
        return (depth >= 0) & (depth <= 1) & (au <= 0.5 * depth)
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def _layout(scene: Scene) -> list[tuple[Shape, tuple[float, float], float]]:
    """(shape, centre, diameter) for each shape: its own geometry if pinned, else the canonical
    placement (anchor or pair slot, mid-range diameter). Unspecified size draws large, position centre."""
    if len(scene.shapes) == 2 and scene.relation is None:
        if any(s.centre is None for s in scene.shapes):
            raise ValueError("two shapes need a relation (left of, right of, above, below) to be placed")
    if len(scene.shapes) > 2 and any(s.centre is None for s in scene.shapes):
        raise ValueError(f"can only place one or two shapes, got {len(scene.shapes)}")
    placed = []
    for k, s in enumerate(scene.shapes):
        centre = s.centre
        if centre is None:
            if scene.relation:
                centre = (PAIR_SLOTS[k], 0.5) if scene.relation == "left of" else (0.5, PAIR_SLOTS[k])
            else:
                centre = ANCHORS[s.position or "centre"]
        diameter = s.diameter if s.diameter is not None else float(np.mean(DIAMETERS[s.size or "large"]))
        placed.append((s, centre, diameter))
    return placed


def render(scene: Scene, size: int = 32) -> Tensor:
    """Draw `scene` as an RGB image [3, size, size] in [-1, 1] on black, anti-aliased by exact
    4x4 supersampling. Pinned geometry is drawn exactly (so this reproduces dataset images);
    otherwise shapes go to their canonical places. Unspecified colour draws white."""
    _check_size(size)
    n = size * SUPERSAMPLE
    grid = (np.arange(n) + 0.5) / n  # sub-sample centres, fractions of the side
    image = np.zeros((size, size, 3))
    for s, (cx, cy), d in _layout(scene):
        mask = inside(s.shape, (grid[None, :] - cx) / d, (grid[:, None] - cy) / d)
        coverage = mask.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
        image += coverage[..., None] * np.asarray(PALETTE[s.colour or "white"])
    image = np.clip(image, 0, 1) * 2 - 1
    return torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1).contiguous()


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"shapes images need size >= 16 pixels (smaller shapes are unreadable), got {size!r}")


# -- sampling and captions ---------------------------------------------------------------------------


def _sample_scene(rng: np.random.Generator, pairs) -> Scene:
    def shape(pair, size, centre, position=None):
        return Shape(*pair, size, position, centre, float(rng.uniform(*DIAMETERS[size])))

    if rng.random() < 0.5:
        pair = pairs[rng.integers(len(pairs))]
        size, position = SIZES[rng.integers(2)], POSITIONS[rng.integers(len(POSITIONS))]
        ax, ay = ANCHORS[position]
        centre = (ax + float(rng.uniform(-JITTER, JITTER)), ay + float(rng.uniform(-JITTER, JITTER)))
        return Scene([shape(pair, size, centre, position)])
    first, second = rng.choice(len(pairs), size=2, replace=False)
    relation = ("left of", "above")[rng.integers(2)]
    shapes = []
    for k, index in enumerate((first, second)):
        along = PAIR_SLOTS[k] + float(rng.uniform(-PAIR_JITTER[0], PAIR_JITTER[0]))
        across = 0.5 + float(rng.uniform(-PAIR_JITTER[1], PAIR_JITTER[1]))
        centre = (along, across) if relation == "left of" else (across, along)
        shapes.append(shape(pairs[index], SIZES[rng.integers(2)], centre))
    return Scene(shapes, relation)


SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
WHERE = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "centre": ("in the centre", "in the middle", "in the center"),
}
RELATION_WORDS = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above",),
    "below": ("below", "under"),
}
SINGLE_TEMPLATES = (
    "a {size} {colour} {shape} {where}",
    "there is a {size} {colour} {shape} {where}",
    "{colour} {shape}, {size}, {position}",
    "{where}, a {size} {colour} {shape}",
    "a {colour} {shape}, {size}, {where}",
    "a {size} {shape} in {colour} {where}",
    "one {size} {colour} {shape} {where}",
)
PAIR_TEMPLATES = (
    "a {a} {relation} a {b}",
    "{a} {relation} {b}",
    "there is a {a} {relation} a {b}",
    "a {a_colour} {a_shape}, {a_size}, {relation} a {b_colour} {b_shape}, {b_size}",
)
FLIP = {"left of": "right of", "above": "below"}


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption for a fully specified scene, from a template and synonyms chosen by `rng`.
    Pairs are phrased either way round ("A left of B" or "B right of A")."""

    def pick(options):
        return options[rng.integers(len(options))]

    if len(scene.shapes) == 1:
        s = scene.shapes[0]
        size, where = pick(SIZE_WORDS[s.size]), pick(WHERE[s.position])
        return pick(SINGLE_TEMPLATES).format(shape=s.shape, colour=s.colour, size=size, position=s.position, where=where)
    a, b = scene.shapes
    relation = scene.relation
    if rng.random() < 0.5:
        a, b, relation = b, a, FLIP[relation]
    words = {"relation": pick(RELATION_WORDS[relation])}
    for key, s in (("a", a), ("b", b)):
        size = pick(SIZE_WORDS[s.size])
        words[key] = f"{size} {s.colour} {s.shape}"
        words.update({f"{key}_shape": s.shape, f"{key}_colour": s.colour, f"{key}_size": size})
    return pick(PAIR_TEMPLATES).format(**words)


# -- reading prompts -----------------------------------------------------------------------------------

_SHAPE_WORDS = {s: s for s in SHAPES}
_COLOUR_WORDS = {c: c for c in COLOURS}
_SIZE_WORDS = {w: size for size, words in SIZE_WORDS.items() for w in words}
_POSITION_WORDS = {**{p: p for p in POSITIONS}, "center": "centre", "middle": "centre"}
_SINGLE_RELATIONS = {"above": "above", "below": "below", "under": "below", "beneath": "below"}
_FILLERS = {"a", "an", "the", "there", "is", "on", "in", "at", "to", "one", "and"}  # "and" so "A and B" asks for a relation


def parse_caption(text: str) -> Scene:
    """Read a caption (any template above, or a plain prompt such as "a red circle") into a Scene.

    Word order inside a shape's description is free; size, colour and position may be left out
    (None: unspecified). Raises ValueError naming what it could not read."""
    if not isinstance(text, str):
        raise ValueError(f"a prompt must be a string, got {type(text).__name__}")
    tokens = re.findall(r"[a-z]+", text.lower())
    relations, k = [], 0
    while k < len(tokens):  # find the relation ("left of", "right of", "above", ...)
        if tokens[k] in ("left", "right") and k + 1 < len(tokens) and tokens[k + 1] == "of":
            relations.append((k, k + 2, f"{tokens[k]} of"))
            k += 2
        elif tokens[k] in _SINGLE_RELATIONS:
            relations.append((k, k + 1, _SINGLE_RELATIONS[tokens[k]]))
            k += 1
        else:
            k += 1
    if len(relations) > 1:
        raise ValueError(f"cannot read prompt {text!r}: more than one relation ({', '.join(r[2] for r in relations)})")
    if not relations:
        return Scene([_parse_shape(tokens, text, in_pair=False)])
    start, end, relation = relations[0]
    first, second = _parse_shape(tokens[:start], text, True), _parse_shape(tokens[end:], text, True)
    return Scene([first, second], relation)


def _parse_shape(tokens: list[str], text: str, in_pair: bool) -> Shape:
    tables = {"shape": _SHAPE_WORDS, "colour": _COLOUR_WORDS, "size": _SIZE_WORDS, "position": _POSITION_WORDS}
    found = {name: [] for name in tables}
    unknown = []
    for token in tokens:
        for name, table in tables.items():
            if token in table:
                found[name].append(table[token])
                break
        else:
            if token not in _FILLERS:
                unknown.append(token)
    if unknown:
        known = f"shapes are {', '.join(SHAPES)}; colours {', '.join(COLOURS)}"
        raise ValueError(f"cannot read prompt {text!r}: unknown words {unknown}; {known}")
    if len(found["shape"]) != 1:
        what = "no shape" if not found["shape"] else f"{len(found['shape'])} shapes ({', '.join(found['shape'])})"
        if in_pair:
            what += " on one side of the relation"
        elif len(found["shape"]) == 2:
            what += " but no relation (left of, right of, above, below)"
        raise ValueError(f"cannot read prompt {text!r}: {what}")
    for name in ("colour", "size", "position"):
        if len(found[name]) > 1:
            values = ", ".join(found[name])
            raise ValueError(f"cannot read prompt {text!r}: one shape has {len(found[name])} {name}s ({values})")
    if in_pair and found["position"]:
        position = found["position"][0]
        raise ValueError(f"cannot read prompt {text!r}: a position ({position}) beside a relation, which places both")
    return Shape(found["shape"][0], *(found[n][0] if found[n] else None for n in ("colour", "size", "position")))


# -- the dataset ---------------------------------------------------------------------------------------


class ShapesDataset:
    """Captioned shapes, generated on demand. `length` is nominal (what `len` reports to a
    training loop); item i is the same whatever the length.

    `ds[i]` -> (image [3, size, size] in [-1, 1], caption, Scene); `ds.batch(indices)` ->
    (images [B, 3, size, size], None) as for every dataset (no class labels);
    `ds.captions(indices)` and `ds.describe(i)` -> (Scene, caption) read captions without drawing."""

    channels = 3
    num_classes = None

    def __init__(self, size: int = 32, split: str = "train", seed: int = 0, length: int = 100_000,
                 cache: bool = False):
        _check_size(size)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if length < 1:
            raise ValueError(f"length must be positive, got {length}")
        self.size, self.split, self.seed, self.length = int(size), split, int(seed), int(length)
        self.name, self.resolution = "shapes", self.size
        self.pairs = TRAIN_PAIRS if split == "train" else HELDOUT_PAIRS
        # a trainer revisits a finite set every epoch: keep each drawn image and caption
        self._cache: dict[int, tuple[Tensor, str]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.length

    def _index(self, i) -> int:
        i = int(i)
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} items")
        return i % self.length

    def describe(self, i) -> tuple[Scene, str]:
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), self._index(i)])
        scene = _sample_scene(rng, self.pairs)
        return scene, caption(scene, rng)

    def __getitem__(self, i) -> tuple[Tensor, str, Scene]:
        scene, text = self.describe(i)
        return render(scene, self.size), text, scene

    def _item(self, i) -> tuple[Tensor, str]:
        i = self._index(i)
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        scene, text = self.describe(i)
        item = render(scene, self.size), text
        if self._cache is not None:
            self._cache[i] = item
        return item

    def batch(self, indices) -> tuple[Tensor, None]:
        """Images at `indices` (a tensor or any sequence of ints); no labels."""
        indices = indices.tolist() if isinstance(indices, Tensor) else list(indices)
        if not indices:
            return torch.empty(0, 3, self.size, self.size), None
        return torch.stack([self._item(i)[0] for i in indices]), None

    def captions(self, indices) -> list[str]:
        indices = indices.tolist() if isinstance(indices, Tensor) else list(indices)
        return [self._item(i)[1] if self._cache is not None else self.describe(i)[1] for i in indices]
