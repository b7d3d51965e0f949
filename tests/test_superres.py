"""Super-resolution building blocks: degradation, bicubic baseline, noise-conditioning augmentation."""

import pytest
import torch

from diffusekit import NoiseSchedule
from diffusekit.pipelines.superres import augment, degrade, psnr, upsample, upscale
from diffusekit.sampling import seeded_generators

SCHED = NoiseSchedule.from_name("cosine")


def test_degrade_is_the_block_mean_and_upsample_keeps_constants():
    x = torch.arange(16.0).reshape(1, 1, 4, 4) / 16 - 0.5
    low = degrade(x, 2)
    assert low.shape == (1, 1, 2, 2)
    torch.testing.assert_close(low[0, 0, 0, 0], x[0, 0, :2, :2].mean())
    flat = torch.full((2, 3, 4, 4), 0.25)
    torch.testing.assert_close(upsample(flat, (8, 8)), torch.full((2, 3, 8, 8), 0.25))
    with pytest.raises(ValueError, match="cannot be downsampled"):
        degrade(torch.zeros(1, 1, 5, 5), 2)
    with pytest.raises(ValueError, match="scale"):
        degrade(x, 1)


def test_augmentation_is_the_forward_process_at_the_level():
    """At level u the image is sqrt(abar_t) x + sqrt(1 - abar_t) eps with t = u (T - 1): mean and
    variance per pixel match the closed form; level 0 leaves it unchanged."""
    x = torch.full((4000, 1, 2, 2), 0.6)
    level = torch.full((4000,), 0.3)
    noised, t = augment(x, level, SCHED, torch.Generator().manual_seed(0))
    abar = float(1 / (1 + SCHED.t_to_sigma(torch.tensor(0.3 * 999.0)) ** 2))
    assert torch.allclose(t, torch.full_like(t, 0.3 * 999))
    assert abs(noised.mean().item() - 0.6 * abar**0.5) < 0.01
    assert abs(noised.var().item() - (1 - abar)) < 0.02
    clean, t0 = augment(x[:3], 0.0, SCHED)
    assert torch.equal(clean, x[:3]) and torch.equal(t0, torch.zeros(3))
    with pytest.raises(ValueError, match="lie in"):
        augment(x[:2], 1.5, SCHED)
    with pytest.raises(ValueError, match="discrete"):
        augment(x[:2], 0.1, NoiseSchedule.continuous())


def test_psnr_closed_form():
    a = torch.zeros(2, 3, 4, 4)
    b = a + 0.1  # mse 0.01 -> 10 log10(4 / 0.01) = 26.02 dB
    torch.testing.assert_close(psnr(a, b), torch.full((2,), 26.0206), atol=1e-3, rtol=0)


class _Spy:
    """A denoiser that records its keyword arguments and returns the (upsampled) conditioning image."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, **cond):
        self.calls.append(cond)
        return cond["concat"] * (1 + 0 * x)


def test_upscale_passes_the_augmented_image_and_seeds_per_image():
    low = torch.rand(3, 1, 4, 4) * 2 - 1
    spy = _Spy()
    out = upscale(spy, SCHED, low, 2, aug=0.0, steps=3, sampler="euler")
    assert out.shape == (3, 1, 8, 8)
    torch.testing.assert_close(spy.calls[0]["concat"], upsample(low, (8, 8)))  # level 0: the clean image
    assert torch.equal(spy.calls[0]["aug_level"], torch.zeros(3))
    torch.testing.assert_close(out, upsample(low, (8, 8)))  # a denoiser returning it lands on it
    # image i of a request depends only on (seed, i): the augmentation noise included
    spy_a, spy_b = _Spy(), _Spy()
    a = upscale(spy_a, SCHED, low, 2, aug=0.2, steps=3, sampler="euler", seed=4)
    b = upscale(spy_b, SCHED, low[:2], 2, aug=0.2, steps=3, sampler="euler", seed=4)
    torch.testing.assert_close(a[:2], b)
    expected, _ = augment(upsample(low, (8, 8)), 0.2, SCHED, seeded_generators(4 + 3_000_009, 3))
    torch.testing.assert_close(spy_a.calls[0]["concat"], expected)
    with pytest.raises(ValueError, match="NaN"):
        upscale(spy, SCHED, torch.full((1, 1, 4, 4), float("nan")), 2)
