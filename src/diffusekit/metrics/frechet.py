"""Distances between two sets of features [N, D]: Fréchet distance, improved precision/recall, KID.

Pure functions on feature tensors; the feature extractor is someone else's business (for digits:
`metrics.classifier`). All arithmetic is float64 on the CPU: these are small matrices and the
Fréchet distance subtracts nearly equal traces, where float32 loses the answer.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _features(x: Tensor, name: str, min_rows: int = 2) -> Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be features [N, D], got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {x.shape[0]}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x.detach().to("cpu", torch.float64)


def _same_dim(x: Tensor, y: Tensor) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D]."""
    x = _features(features, "features")
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(s: Tensor) -> Tensor:
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance_from_stats(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2).

    The usual code takes sqrtm(S1 S2), a non-symmetric matrix whose square root picks up imaginary
    parts and fails on singular covariances. S1^1/2 S2 S1^1/2 has the same eigenvalues but is
    symmetric positive semi-definite, so two `eigh` calls give the trace exactly, with round-off
    negatives clipped to zero (features after a ReLU give singular covariances)."""
    mu1, mu2 = (torch.as_tensor(m, dtype=torch.float64) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(s, dtype=torch.float64) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"mismatched statistics: means {tuple(mu1.shape)}, {tuple(mu2.shape)}; "
                         f"covariances {tuple(s1.shape)}, {tuple(s2.shape)}")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    cross = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    d = (mu1 - mu2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross
    return max(float(d), 0.0)


def frechet_distance(x: Tensor, y: Tensor) -> float:
    """Fréchet distance between Gaussian fits of feature sets x [N, D] and y [M, D].

    Biased upwards for small sets (the covariance estimate's noise adds to it): only compare
    values computed with the same numbers of samples."""
    x, y = _features(x, "x"), _features(y, "y")
    _same_dim(x, y)
    return frechet_distance_from_stats(*gaussian_stats(x), *gaussian_stats(y))


def _kth_neighbour_radii(x: Tensor, k: int, chunk: int) -> Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    radii = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the +1 skips the point itself (distance 0)
    return torch.cat(radii)


def _inside_any_ball(points: Tensor, centres: Tensor, radii: Tensor, chunk: int) -> Tensor:
    inside = []
    for i in range(0, len(points), chunk):
        d = torch.cdist(points[i:i + chunk], centres)
        inside.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Each set's manifold is the union of balls around its points reaching each point's k-th nearest
    neighbour. Precision: fraction of fake points inside the real manifold (quality). Recall:
    fraction of real points inside the fake manifold (coverage)."""
    real, fake = _features(real, "real", k + 1), _features(fake, "fake", k + 1)
    _same_dim(real, fake)
    real_radii = _kth_neighbour_radii(real, k, chunk)
    fake_radii = _kth_neighbour_radii(fake, k, chunk)
    precision = _inside_any_ball(fake, real, real_radii, chunk).double().mean()
    recall = _inside_any_ball(real, fake, fake_radii, chunk).double().mean()
    return float(precision), float(recall)


def kernel_inception_distance(x: Tensor, y: Tensor, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): unbiased MMD^2 with the kernel k(a, b) = (a.b / D + 1)^3,
    averaged over random subsets. Returns (mean, std over subsets).

    Unlike the Fréchet distance it is unbiased, so small sample sets compare fairly; it can come
    out slightly negative when the sets match. Subsets are drawn with `seed`, so a call repeats."""
    x, y = _features(x, "x"), _features(y, "y")
    _same_dim(x, y)
    n = min(subset_size, len(x), len(y))
    d = x.shape[1]
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(num_subsets):
        a = x[torch.randperm(len(x), generator=g)[:n]]
        b = y[torch.randperm(len(y), generator=g)[:n]]
        kxx, kyy, kxy = ((p @ q.T / d + 1) ** 3 for p, q in ((a, a), (b, b), (a, b)))
        off = n * (n - 1)
        mmd = ((kxx.sum() - kxx.diagonal().sum()) / off + (kyy.sum() - kyy.diagonal().sum()) / off
               - 2 * kxy.mean())
        values.append(mmd)
    v = torch.stack(values)
    return float(v.mean()), float(v.std()) if len(v) > 1 else 0.0
