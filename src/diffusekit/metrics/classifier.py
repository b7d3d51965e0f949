"""Small CNN digit classifiers with an eleventh "not a digit" class, one per built-in digit set.

They are the feature extractors and judges of `metrics.digits`: an Inception network knows nothing
about 8x8 grey digits, and a plain 10-way classifier calls a smudge confidently a "1". Class 10
("junk") is trained on images made on the fly from the training digits (noise, blurred noise,
shuffled pixels, heavy blur, blends, overlays, half-erased digits, blank images), so samples of a
broken model are counted as broken instead of being spread over the digits.

The weights ship in `weights/{digits,mnist}_classifier.safetensors` with a JSON beside each (the
architecture, the split and the held-out scores). Reproduce them with

    python benchmarks/train_digit_classifiers.py --train [--dataset digits mnist] [--out DIR]

(seeded and single-threaded, so the same torch build on the same CPU gives the same bytes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from .._utils import _umask, atomic_path
from .frechet import frechet_distance

WEIGHTS_DIR = Path(__file__).parent / "weights"
DIGIT_DATASETS = ("digits", "mnist")
JUNK = 10  # index of the "not a digit" class
JUNK_KINDS = ("noise", "smooth_noise", "shuffled", "blurred", "blend", "overlay", "erased", "blank")
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0  # numpy's RandomState stream is frozen across versions, so the split never moves


@dataclass
class ClassifierConfig:
    """Architecture: per stage a 3x3 conv + ReLU + 2x2 max-pool (odd sides round up, so 7 -> 4
    keeps the border), then flatten -> Linear -> ReLU (the features) -> Linear to 10 digits + junk."""

    dataset: str = "digits"
    resolution: int = 8
    widths: tuple[int, ...] = (32, 64)
    feature_dim: int = 64
    num_classes: int = 11

    def __post_init__(self):
        self.widths = tuple(self.widths)  # JSON gives a list


@dataclass
class TrainSettings:
    epochs: int = 30
    batch_size: int = 128
    junk_per_batch: int = 64  # junk spans many kinds of thing, so it gets more than 1/11 of the batch
    # the kinds dealt in equal shares; two digits mixed are the hard ones (the rest are learnt
    # within a few epochs), so they come three times
    junk_kinds: tuple[str, ...] = JUNK_KINDS + ("blend", "overlay") * 2
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    eval_seed: int = 1  # held-out junk is drawn from held-out digits with another seed
    label_smoothing: float = 0.0  # of the cross-entropy targets; 0 is plain cross-entropy


CONFIGS = {
    "digits": ClassifierConfig("digits", 8, (64, 128), 128),
    "mnist": ClassifierConfig("mnist", 28, (16, 32, 64, 128), 128),
}
SETTINGS = {
    # issue 5: the old (32, 64) net, 150 epochs, 64 junk a batch, no smoothing rated 2.9% of the
    # held-out junk a confident digit (blends 16%, overlays 6%); twice the widths, then more junk
    # a batch, label smoothing 0.05 and 200 epochs each took some off (benchmarks/RESULTS.md)
    "digits": TrainSettings(epochs=200, junk_per_batch=96, label_smoothing=0.05),
    "mnist": TrainSettings(epochs=30),
}


class DigitClassifier(nn.Module):
    """A plain small CNN (see ClassifierConfig); `features` for distances, `forward` for logits."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        layers, c, r = [], 1, config.resolution
        for w in config.widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
            c, r = w, (r + 1) // 2
        self.conv = nn.Sequential(*layers)
        self.hidden = nn.Linear(c * r * r, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features [N, feature_dim] (after the ReLU) for Fréchet distances."""
        # [-1, 1] -> [0, 1]: the background becomes 0, so zero padding looks like more background
        h = self.conv((x + 1) / 2)
        return F.relu(self.hidden(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """Logits [N, 11]; class 10 is "not a digit"."""
        return self.head(self.features(x))


# -- data: split and junk -----------------------------------------------------------------------


def load_split(dataset: str) -> dict[str, Tensor]:
    """The fixed train / held-out split: train_images, train_labels, heldout_images, heldout_labels."""
    from ..data import load_dataset

    if dataset not in DIGIT_DATASETS:
        raise ValueError(f"unknown digit dataset {dataset!r}; choose one of {', '.join(DIGIT_DATASETS)}")
    data = load_dataset(dataset)
    perm = torch.as_tensor(np.random.RandomState(SPLIT_SEED).permutation(len(data)))
    n_held = round(HELDOUT_FRACTION * len(data))
    held, train = perm[:n_held], perm[n_held:]
    return dict(train_images=data.images[train], train_labels=data.labels[train],
                heldout_images=data.images[held], heldout_labels=data.labels[held])


def _rand(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Blur each image of x [N, 1, H, W] with its own sigma [N] (pixels); edges replicate."""
    n, _, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None].clamp(min=1e-3)) ** 2)
    k = k / k.sum(1, keepdim=True)  # [N, 2r+1]
    y = F.pad(x.reshape(1, n, h, w), (radius,) * 4, mode="replicate")
    y = F.conv2d(y, k[:, None, :, None], groups=n)  # along H
    y = F.conv2d(y, k[:, None, None, :], groups=n)  # along W
    return y.reshape(n, 1, h, w)


def _other_label_pairs(labels: Tensor, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """n index pairs (i, j) into labels with different labels."""
    i = torch.randint(len(labels), (n,), generator=g)
    j = torch.randint(len(labels), (n,), generator=g)
    same = labels[i] == labels[j]
    while same.any():  # redraw the few collisions (1 in 10)
        j[same] = torch.randint(len(labels), (int(same.sum()),), generator=g)
        same = labels[i] == labels[j]
    return i, j


def make_junk(images: Tensor, labels: Tensor, n: int, g: torch.Generator,
              kinds: tuple[str, ...] = JUNK_KINDS) -> tuple[Tensor, Tensor]:
    """n "not a digit" images [n, 1, H, W] in [-1, 1] made from real digits, and the index into
    `kinds` of each. Blur widths scale with the resolution, so a kind means the same at 8x8 and
    28x28. Kinds are dealt in equal shares (in a random order)."""
    res = images.shape[-1]
    kind_of = torch.arange(n) % len(kinds)
    kind_of = kind_of[torch.randperm(n, generator=g)]
    out = torch.empty(n, 1, res, res)
    for k, kind in enumerate(kinds):
        idx = (kind_of == k).nonzero().flatten()
        m = len(idx)
        if m == 0:
            continue
        src = images[torch.randint(len(images), (m,), generator=g)]
        if kind == "noise":  # white noise of random level and spread
            x = _rand(m, -1, 0.3, g)[:, None, None, None] + _rand(m, 0.2, 1.0, g)[:, None, None, None] * \
                torch.randn(m, 1, res, res, generator=g)
        elif kind == "smooth_noise":  # blobs: blurred noise stretched to a random contrast
            z = gaussian_blur(torch.randn(m, 1, res, res, generator=g), _rand(m, 0.06, 0.2, g) * res)
            z = (z - z.mean((1, 2, 3), keepdim=True)) / z.std((1, 2, 3), keepdim=True).clamp(min=1e-6)
            x = _rand(m, -1, 0, g)[:, None, None, None] + _rand(m, 0.4, 1.5, g)[:, None, None, None] * z
        elif kind == "shuffled":  # a digit's own pixels in random places
            perm = torch.rand(m, res * res, generator=g).argsort(1)
            x = src.flatten(1).gather(1, perm).reshape(m, 1, res, res)
        elif kind == "blurred":  # heavy blur, half of them stretched back to full contrast
            x = gaussian_blur(src, _rand(m, 0.12, 0.25, g) * res)
            lo, hi = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
            stretched = (x - lo) / (hi - lo).clamp(min=1e-6) * 2 - 1
            x = torch.where(torch.rand(m, 1, 1, 1, generator=g) < 0.5, stretched, x)
        elif kind in ("blend", "overlay"):  # two different digits averaged, or drawn over each other
            i, j = _other_label_pairs(labels, m, g)
            a, b = images[i], images[j]
            if kind == "blend":
                alpha = _rand(m, 0.35, 0.65, g)[:, None, None, None]
                x = alpha * a + (1 - alpha) * b
            else:
                x = torch.maximum(a, b)
        elif kind == "erased":  # the half (top, bottom, left or right) holding the most ink wiped out
            cut = (_rand(m, 0.4, 0.6, g) * res).round().long()
            rows = torch.arange(res)[None, :, None].expand(m, res, res)
            cols = torch.arange(res)[None, None, :].expand(m, res, res)
            c = cut[:, None, None]
            masks = torch.stack([rows < c, rows >= c, cols < c, cols >= c], 1)[:, :, None]  # [m, 4, 1, H, W]
            ink = (src + 1)[:, None]
            best = (ink * masks).sum((2, 3, 4)).argmax(1)
            mask = masks[torch.arange(m), best]
            x = torch.where(mask, torch.full_like(src, -1.0), src)
        elif kind == "blank":  # an empty or uniform image with a little noise
            level = torch.where(torch.rand(m, generator=g) < 0.5, _rand(m, -1, 1, g), torch.full((m,), -1.0))
            x = level[:, None, None, None] + 0.1 * torch.randn(m, 1, res, res, generator=g)
        else:
            raise ValueError(f"unknown junk kind {kind!r}; known: {', '.join(JUNK_KINDS)}")
        out[idx] = x.clamp(-1, 1)
    return out, kind_of


def augment(x: Tensor, g: torch.Generator, p_move: float = 0.5, p_blur: float = 0.25, p_noise: float = 0.25) -> Tensor:
    """Real digits as a generator might draw them: small random rotations, scalings and shifts
    (a fraction `p_move`), a mild blur (sigma up to 0.06 of the side, half the lightest junk blur;
    `p_blur`) and a little noise (std up to 0.25; `p_noise`). The rest pass unchanged.

    Without the mild blur and noise, any softness or grain becomes a cue for junk (tried: 100% of
    the MNIST digits blurred with sigma 1.7 px, still legible, were rated junk): the junk class
    should mean "not a digit", and the Fréchet distance is there to grade the finish. Junk is
    made from the same mix of raw and altered digits, else "looks resampled" becomes a cue for "is
    a digit" (tried: 30% of the raw held-out digits were then rated junk)."""
    n, res = len(x), x.shape[-1]
    angle = _rand(n, -10, 10, g) * math.pi / 180
    scale = _rand(n, 0.9, 1.1, g)
    shift = _rand(2 * n, -0.1, 0.1, g).reshape(n, 2)  # in [-1, 1] image coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # sample x + 1 with zero padding, so what comes in from outside is background (-1)
    moved = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    x = torch.where(torch.rand(n, 1, 1, 1, generator=g) < p_move, moved, x)
    blurred = gaussian_blur(x, _rand(n, 0.2, 0.06 * res, g))
    x = torch.where(torch.rand(n, 1, 1, 1, generator=g) < p_blur, blurred, x)
    noisy = x + _rand(n, 0, 0.25, g)[:, None, None, None] * torch.randn(x.shape, generator=g)
    return torch.where(torch.rand(n, 1, 1, 1, generator=g) < p_noise, noisy, x).clamp(-1, 1)


# -- training and scoring -----------------------------------------------------------------------


@torch.no_grad()
def predict_proba(model: DigitClassifier, images: Tensor, batch_size: int = 1000) -> Tensor:
    """Softmax probabilities [N, 11]."""
    return torch.cat([model(images[i:i + batch_size]).softmax(1) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def features(model: DigitClassifier, images: Tensor, batch_size: int = 1000) -> Tensor:
    """Penultimate features [N, D]."""
    return torch.cat([model.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def score(model: DigitClassifier, split: dict[str, Tensor], eval_seed: int = 1, junk_per_kind: int = 500,
          confident: float = 0.5) -> dict:
    """Held-out scores.

    accuracy: fraction of held-out digits whose top class of all 11 is the right digit (a digit
    rated junk counts as wrong); accuracy_10: the same with the junk class ignored.
    junk_confident_rate: fraction of held-out junk (made from held-out digits with `eval_seed`,
    every kind equally often) whose top class is a digit with probability > `confident`;
    junk_recall: fraction whose top class is junk.
    fd_train_vs_heldout: Fréchet distance of the training digits' features to the held-out ones
    (what real data scores); fd_noise: the same for as many uniform-noise images (what nothing
    scores)."""
    model.eval()
    x, y = split["heldout_images"], split["heldout_labels"]
    p = predict_proba(model, x)
    g = torch.Generator().manual_seed(eval_seed)
    junk, kind = make_junk(x, y, junk_per_kind * len(JUNK_KINDS), g)
    pj = predict_proba(model, junk)
    confident_digit = (pj.argmax(1) != JUNK) & (pj.max(1).values > confident)
    return dict(
        heldout_digits=len(x),
        accuracy=float((p.argmax(1) == y).double().mean()),
        accuracy_10=float((p[:, :JUNK].argmax(1) == y).double().mean()),
        real_rated_junk=float((p.argmax(1) == JUNK).double().mean()),
        heldout_junk=len(junk),
        junk_recall=float((pj.argmax(1) == JUNK).double().mean()),
        junk_confident_rate=float(confident_digit.double().mean()),
        junk_confident_rate_by_kind={k: float(confident_digit[kind == i].double().mean())
                                     for i, k in enumerate(JUNK_KINDS)},
        fd_train_vs_heldout=frechet_distance(features(model, split["train_images"]), features(model, x)),
        fd_noise=frechet_distance(features(model, torch.rand(split["train_images"].shape, generator=g) * 2 - 1),
                                  features(model, x)),
    )


def train_classifier(dataset: str, config: ClassifierConfig | None = None, settings: TrainSettings | None = None,
                     split: dict[str, Tensor] | None = None, log=print) -> tuple[DigitClassifier, dict]:
    """Train one classifier from scratch (AdamW, one-cycle LR). Returns the model and its report."""
    config = config or CONFIGS[dataset]
    settings = settings or SETTINGS[dataset]
    split = split or load_split(dataset)
    x, y = split["train_images"], split["train_labels"]
    torch.manual_seed(settings.seed)
    model = DigitClassifier(config)
    g = torch.Generator().manual_seed(settings.seed)
    steps_per_epoch = math.ceil(len(x) / settings.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lr, total_steps=settings.epochs * steps_per_epoch)
    start = time.perf_counter()
    for epoch in range(settings.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(x), settings.batch_size):
            idx = perm[i:i + settings.batch_size]
            source = torch.randint(len(x), (2 * settings.junk_per_batch,), generator=g)
            junk, _ = make_junk(augment(x[source], g), y[source], settings.junk_per_batch, g, settings.junk_kinds)
            inputs = torch.cat([augment(x[idx], g), junk])
            targets = torch.cat([y[idx], torch.full((len(junk),), JUNK)])
            loss = F.cross_entropy(model(inputs), targets, label_smoothing=settings.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        if log and (epoch + 1) % 5 == 0:
            log(f"{dataset} epoch {epoch + 1}/{settings.epochs} loss {total / steps_per_epoch:.4f} "
                f"({time.perf_counter() - start:.0f} s)")
    seconds = time.perf_counter() - start
    report = dict(score(model, split, settings.eval_seed), train_seconds=round(seconds, 1),
                  threads=torch.get_num_threads(), torch=torch.__version__)
    return model, report


def save_classifier(model: DigitClassifier, report: dict, settings: TrainSettings, out: Path = WEIGHTS_DIR) -> Path:
    """Write {dataset}_classifier.safetensors and .json (config, training settings, scores), atomically."""
    name = model.config.dataset
    meta = dict(config=asdict(model.config), settings=asdict(settings), split=dict(
        heldout_fraction=HELDOUT_FRACTION, seed=SPLIT_SEED, rule="numpy RandomState(seed).permutation(N); "
        "the first round(fraction * N) indices are held out"), junk_kinds=list(JUNK_KINDS), scores=report)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(Path(out) / f"{name}_classifier.safetensors") as p:
        save_file(weights, str(p), metadata={"format": "diffusekit-digit-classifier"})
        os.chmod(p, 0o666 & ~_umask())  # save_file recreates the file with 0600
    with atomic_path(Path(out) / f"{name}_classifier.json") as p:
        p.write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out) / f"{name}_classifier.safetensors"


def classifier_info(dataset: str, folder: Path = WEIGHTS_DIR) -> dict:
    """The JSON beside the weights: config, settings, split rule, held-out scores."""
    if dataset not in DIGIT_DATASETS:
        raise ValueError(f"unknown digit dataset {dataset!r}; choose one of {', '.join(DIGIT_DATASETS)}")
    path = Path(folder) / f"{dataset}_classifier.json"
    if not path.is_file():
        raise ValueError(f"no classifier for {dataset!r} at {path}; train one with "
                         "benchmarks/train_digit_classifiers.py --train")
    return json.loads(path.read_text())


def load_classifier(dataset: str, folder: Path | None = None) -> DigitClassifier:
    """The shipped classifier for `dataset` ("digits" or "mnist"), in eval mode (safetensors only)."""
    folder = Path(folder) if folder is not None else WEIGHTS_DIR
    info = classifier_info(dataset, folder)
    model = DigitClassifier(ClassifierConfig(**info["config"]))
    model.load_state_dict(load_file(str(folder / f"{dataset}_classifier.safetensors")))
    return model.eval().requires_grad_(False)


@lru_cache(maxsize=None)
def _shipped(dataset: str) -> DigitClassifier:
    """One shared instance per dataset of the shipped weights (callers must not modify it)."""
    return load_classifier(dataset)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="train_digit_classifiers.py",
                                     description="Train (or score) the digit classifiers used by diffusekit.metrics.")
    parser.add_argument("--train", action="store_true", help="train and write the weights (default: score the shipped ones)")
    parser.add_argument("--dataset", nargs="+", default=list(DIGIT_DATASETS), choices=DIGIT_DATASETS)
    parser.add_argument("--out", default=str(WEIGHTS_DIR), help="folder for the weights and JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 makes runs reproducible)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for dataset in args.dataset:
        if args.train:
            model, report = train_classifier(dataset)
            path = save_classifier(model, report, SETTINGS[dataset], Path(args.out))
            print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
        else:
            model = load_classifier(dataset, Path(args.out))
            report = score(model, load_split(dataset), SETTINGS[dataset].eval_seed)
        print(json.dumps({dataset: report}, indent=2))

