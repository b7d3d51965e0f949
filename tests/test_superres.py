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
    out = upscale(spy, SCHED, low, 2, aug=0.0, steps=3, sampler="euler", consistent=False)
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


# device cpu: the trainer takes CUDA when there is one, and these tests check CPU facts (bit-exact resume)
FAST = dict(batch_size=8, checkpoint_every=3, sample_every=3, num_samples=4, sample_steps=2, log_every=1,
            warmup_steps=1, data="digits", resolution=16, task="superres", scale=2, lr_schedule="constant",
            device="cpu")


def test_text_superres_stage_keeps_min_snr_without_a_floor(tmp_path):
    """Text-to-image models default to a min-SNR floor (their layout is learnt at high noise); an
    SR stage takes its layout from its input, so a text-conditioned one keeps plain min-SNR."""
    import json

    from diffusekit.train import TrainConfig, load, train

    run = train(TrainConfig(out=str(tmp_path / "sr"), steps=1, text_encoder="learned",
                            **{**FAST, "data": "shapes", "sample_every": 10}), progress=False)
    assert json.loads((load(run).path / "config.json").read_text())["train"]["snr_floor"] == 0.0


def test_superres_training_resumes_exactly_and_upscales(tmp_path):
    """A --task superres run: the U-Net sees the noised upsampled image and its level; resume is
    bit-exact (the augmentation draws are per-step streams); the model upscales 8 -> 16 px, and
    `diffusekit sample` points to `upscale` instead."""
    from safetensors.torch import load_file

    from diffusekit.cli import main
    from diffusekit.images import save_image, tensor_to_pil
    from diffusekit.train import TrainConfig, load, train

    straight = train(TrainConfig(out=str(tmp_path / "a"), steps=4, **FAST), progress=False)
    half = train(TrainConfig(out=str(tmp_path / "b"), steps=3, **FAST), progress=False)
    resumed = train(TrainConfig(out=str(half), steps=4, **FAST), resume=True, progress=False)
    a = load_file(str(load(straight).path / "model.safetensors"))
    b = load_file(str(load(resumed).path / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    model = load(straight)
    assert model.config["superres"] == {"scale": 2, "aug_max": 0.5}
    assert model.network.config.concat_channels == 1 and model.network.config.augmentation_embedding
    low = torch.rand(2, 1, 8, 8) * 2 - 1
    high = upscale(model.denoiser, model.schedule, low, 2, aug=0.1, steps=3, clip=(-1.0, 1.0))
    assert high.shape == (2, 1, 16, 16) and torch.isfinite(high).all()
    save_image(tensor_to_pil(low[0]), tmp_path / "low.png")
    assert main(["upscale", str(straight), "--image", str(tmp_path / "low.png"), "-o", str(tmp_path / "up.png"),
                 "--steps", "2"]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "up.png").size == (16, 16)
    assert main(["sample", str(straight), "-o", str(tmp_path / "g.png")]) != 0  # needs a low-resolution image
    assert main(["upscale", str(straight), "--image", str(tmp_path / "low.png"), "-o", str(tmp_path / "x.png"),
                 "--scale", "4"]) != 0  # trained for 2
    # consistency (default at aug 0): the upscale downsampled gives the input back, even from a
    # barely trained model; without it, it does not
    consistent = upscale(model.denoiser, model.schedule, low, 2, steps=3)
    torch.testing.assert_close(degrade(consistent, 2), low, atol=1e-5, rtol=0)
    free = upscale(model.denoiser, model.schedule, low, 2, steps=3, consistent=False)
    assert (degrade(free, 2) - low).abs().max() > 1e-2


def test_superres_settings_are_checked(tmp_path):
    from diffusekit.train import TrainConfig, train

    with pytest.raises(ValueError, match="--scale 3 does not divide"):
        train(TrainConfig(out=str(tmp_path / "a"), steps=1, **{**FAST, "scale": 3}), progress=False)
    with pytest.raises(ValueError, match="--aug-max"):
        train(TrainConfig(out=str(tmp_path / "b"), steps=1, **{**FAST, "aug_max": 2.0}), progress=False)
    with pytest.raises(ValueError, match="--task"):
        train(TrainConfig(out=str(tmp_path / "c"), steps=1, **{**FAST, "task": "inpaint"}), progress=False)
    assert not (tmp_path / "a").exists()


def test_cascade_chains_a_base_model_and_an_sr_stage(tmp_path):
    from PIL import Image

    from diffusekit.cli import main
    from diffusekit.pipelines.superres import cascade
    from diffusekit.train import TrainConfig, load, train

    base_kw = {k: v for k, v in FAST.items() if k not in ("task", "scale", "resolution")}
    base = load(train(TrainConfig(out=str(tmp_path / "base"), steps=2, class_conditional=True, **base_kw),
                      progress=False))
    sr = load(train(TrainConfig(out=str(tmp_path / "sr"), steps=2, class_conditional=True, **FAST), progress=False))
    low, high = cascade(base, sr, 3, class_labels=7, aug=0.2, base_options={"steps": 2, "guidance": 2.0},
                        sr_options={"steps": 2})
    assert low.shape == (3, 1, 8, 8) and high.shape == (3, 1, 16, 16)
    assert low.abs().max() <= 1 and high.abs().max() <= 1
    assert main(["cascade", str(base.path), str(sr.path), "--class", "3", "-n", "2", "--base-steps", "2",
                 "--sr-steps", "2", "-o", str(tmp_path / "c.png"), "--low-output", str(tmp_path / "l.png")]) == 0
    assert Image.open(tmp_path / "c.png").size == Image.open(tmp_path / "l.png").size  # grids of 2, tiles >= 32 px
    with pytest.raises(ValueError, match="not a super-resolution model"):
        cascade(base, base, 1)
    base16 = load(train(TrainConfig(out=str(tmp_path / "b16"), steps=1, resolution=16, **base_kw), progress=False))
    with pytest.raises(ValueError, match="takes"):  # 16 px base outputs for an SR stage that takes 8 px
        cascade(base16, sr, 1)


def test_superres_trains_on_crops_aligned_to_the_low_resolution_grid(tmp_path, monkeypatch):
    """--crop: each training image is a window of a data image at an offset on the low-resolution
    grid (so its degraded version is a window of the whole image's), and the model still upscales
    whole images."""
    from diffusekit.data import load_dataset
    from diffusekit.train import TrainConfig, load, loop, train
    from diffusekit.train.core import global_batch_indices

    seen = []
    real_loss = loop.diffusion_loss

    def spy(denoiser, x0, **kw):
        seen.append(x0.detach().clone())
        return real_loss(denoiser, x0, **kw)

    monkeypatch.setattr(loop, "diffusion_loss", spy)
    run = train(TrainConfig(out=str(tmp_path / "r"), steps=2, crop=8, **FAST), progress=False)
    data = load_dataset("digits", 16)
    offsets = set()
    for step, x0 in enumerate(seen):
        assert x0.shape == (8, 1, 8, 8)
        images, _ = data.batch(global_batch_indices(0, step, 8, len(data)))
        for crop, image in zip(x0, images):
            hits = [(r, c) for r in range(9) for c in range(9) if torch.equal(crop, image[:, r:r + 8, c:c + 8])]
            assert hits and any(r % 2 == 0 and c % 2 == 0 for r, c in hits)
            offsets.update(hits)
    assert len(offsets) > 3  # the windows move
    model = load(run)
    high = upscale(model.denoiser, model.schedule, torch.zeros(1, 1, 8, 8), 2, steps=2)
    assert high.shape == (1, 1, 16, 16)
    seen.clear()  # --whole-after: crops for the first half of the budget, whole images after it
    train(TrainConfig(out=str(tmp_path / "w"), steps=2, crop=8, whole_after=0.5, **FAST), progress=False)
    assert [tuple(x0.shape[-2:]) for x0 in seen] == [(8, 8), (16, 16)]
    for bad in (7, 18):  # off the low-resolution grid; larger than the images
        with pytest.raises(ValueError, match=f"--crop {bad}: must be a multiple of 2 .* at most the 16px"):
            train(TrainConfig(out=str(tmp_path / "b"), steps=1, **{**FAST, "crop": bad}), progress=False)
    with pytest.raises(ValueError, match="--crop.*only --task superres"):
        TrainConfig(crop=8).validate()
