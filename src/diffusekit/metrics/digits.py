"""Quality of generated digits, judged by the shipped digit classifier of the same dataset.

    digit_metrics(images, "digits")  ->  {"fd_digits": ..., "confidence": ..., "junk_rate": ..., ...}

The reference is the classifier's held-out split of the real data (images it never trained on),
computed once per process. The JSON beside the weights records what real data scores
(`scores.fd_train_vs_heldout`: the training digits against the held-out ones) and what pure noise
scores (`scores.fd_noise`), to read a number against.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from .classifier import DIGIT_DATASETS, JUNK, _shipped, load_split
from .frechet import frechet_distance_from_stats, gaussian_stats, precision_recall

log = logging.getLogger(__name__)

K_NEIGHBOURS = 3  # improved precision/recall's k (the paper's choice)


def _check_dataset(dataset: str) -> None:
    if dataset not in DIGIT_DATASETS:
        raise ValueError(f"unknown digit dataset {dataset!r}; choose one of {', '.join(DIGIT_DATASETS)}")


def prepare_images(images: Tensor, dataset: str) -> tuple[Tensor, str | None]:
    """Validate images [N, 1, H, W] in [-1, 1] and resize them to the classifier's resolution
    (area when shrinking, bilinear when enlarging). Returns float32 CPU images and a note when
    resized (None otherwise).

    Small overshoots (samplers land a little outside [-1, 1]) are clamped; values far outside mean
    the images are in [0, 255] or unnormalised, which is an error rather than something to guess."""
    _check_dataset(dataset)
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a torch.Tensor [N, 1, H, W], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"digit metrics need grey images [N, 1, H, W], got shape {tuple(images.shape)}")
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be square, got {images.shape[-2]}x{images.shape[-1]}")
    x = images.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or inf")
    if len(x) and (x.amin() < -1.5 or x.amax() > 1.5):
        raise ValueError(f"images must be in [-1, 1], got values in [{x.amin():.3g}, {x.amax():.3g}]")
    x = x.clamp(-1, 1)
    res = _shipped(dataset).config.resolution
    if x.shape[-1] == res:
        return x, None
    note = f"resized from {x.shape[-1]}x{x.shape[-1]} to the {dataset} classifier's {res}x{res}"
    if x.shape[-1] > res:
        x = F.interpolate(x, size=(res, res), mode="area")
    else:
        x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False)
    return x.clamp(-1, 1), note


@torch.no_grad()
def _classify(images: Tensor, dataset: str, batch_size: int = 1000) -> tuple[Tensor, Tensor, str | None]:
    x, note = prepare_images(images, dataset)
    if note:
        log.warning(note)
    model = _shipped(dataset)
    feats, probs = [torch.empty(0, model.config.feature_dim, dtype=torch.float64)], [torch.empty(0, JUNK + 1)]
    for i in range(0, len(x), batch_size):
        f = model.features(x[i:i + batch_size])
        feats.append(f.double())
        probs.append(model.head(f).softmax(1))
    return torch.cat(feats), torch.cat(probs), note


def digit_features(images: Tensor, dataset: str = "digits") -> tuple[Tensor, Tensor]:
    """The classifier's penultimate features [N, D] (float64) and 11-way probabilities [N, 11]
    for images [N, 1, H, W] in [-1, 1] (validated and resized as in `prepare_images`).

    Runs on the CPU whatever the images' device: the nets are tiny and this keeps the numbers the
    same on every machine."""
    feats, probs, _ = _classify(images, dataset)
    return feats, probs


@lru_cache(maxsize=None)
def heldout_reference(dataset: str) -> dict[str, Tensor]:
    """Held-out real digits through the classifier: features, mean, covariance, and the predicted
    digit histogram (the classifier's own, so its biases cancel in `class_kl`). Cached."""
    _check_dataset(dataset)
    feats, probs = digit_features(load_split(dataset)["heldout_images"], dataset)
    mu, sigma = gaussian_stats(feats)
    counts = torch.bincount(probs[:, :JUNK].argmax(1), minlength=JUNK).double()
    return dict(features=feats, mu=mu, sigma=sigma, class_counts=counts)


def _smoothed(counts: Tensor) -> Tensor:
    """Add-one (Laplace) smoothing, so an empty class gives a large but finite KL."""
    return (counts + 1) / (counts.sum() + len(counts))


def digit_metrics(images: Tensor, dataset: str = "digits", labels: Tensor | None = None) -> dict:
    """Scores of generated digits [N, 1, H, W] in [-1, 1] against the held-out real split.

    fd_digits   Fréchet distance of the classifier's penultimate features (lower is better;
                biased upwards for small N, so compare runs at the same N)
    confidence  mean over images of the largest digit probability (of the 11-way softmax, so an
                image the classifier calls junk has low confidence)
    junk_rate   fraction whose top class is "not a digit"
    class_kl    KL(real || generated) of the predicted-digit histograms (top digit class of every
                image, add-one smoothed): large when digits are missing (mode collapse)
    precision   fraction of generated features inside the real manifold (k=3 NN balls)
    recall      fraction of real features inside the generated manifold
    class_accuracy  (with `labels` [N], the classes asked of a class-conditional model) fraction
                whose top class of all 11 is the requested digit
    n           number of images; note: present when the images were resized

    For KID, call `frechet.kernel_inception_distance` on `digit_features(...)[0]`."""
    feats, probs, note = _classify(images, dataset)
    n = len(feats)
    if n < K_NEIGHBOURS + 1:
        raise ValueError(f"need at least {K_NEIGHBOURS + 1} images, got {n}")
    if labels is not None:
        labels = torch.as_tensor(labels).to("cpu")
        if labels.shape != (n,) or labels.is_floating_point():
            raise ValueError(f"labels must be integers [N={n}], got {labels.dtype} {tuple(labels.shape)}")
        if labels.min() < 0 or labels.max() >= JUNK:
            raise ValueError(f"labels must be digits 0-9, got values in [{labels.min()}, {labels.max()}]")
    ref = heldout_reference(dataset)
    mu, sigma = gaussian_stats(feats)
    precision, recall = precision_recall(ref["features"], feats, k=K_NEIGHBOURS)
    p_real = _smoothed(ref["class_counts"])
    p_fake = _smoothed(torch.bincount(probs[:, :JUNK].argmax(1), minlength=JUNK).double())
    out = dict(
        fd_digits=frechet_distance_from_stats(mu, sigma, ref["mu"], ref["sigma"]),
        confidence=float(probs[:, :JUNK].max(1).values.double().mean()),
        junk_rate=float((probs.argmax(1) == JUNK).double().mean()),
        class_kl=float((p_real * (p_real / p_fake).log()).sum()),
        precision=precision,
        recall=recall,
    )
    if labels is not None:
        out["class_accuracy"] = float((probs.argmax(1) == labels).double().mean())
    out["n"] = n
    if note:
        out["note"] = note
    return out
