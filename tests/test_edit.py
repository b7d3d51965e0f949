"""Inpainting (replace, RePaint) and img2img against exact denoisers, and the CLI round trip."""

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit import GaussianMixture, NoiseSchedule
from diffusekit.pipelines.edit import add_edit_parsers, img2img, img2img_sigmas, inpaint, repaint_path
from diffusekit.pipelines.generate import generate
from diffusekit.sampling import randn_like, seeded_generators

SCHED = NoiseSchedule.from_name("linear")
SHAPE = (1, 4, 4)  # 16-D data seen as tiny images
RIGHT_HALF = torch.zeros(1, *SHAPE)
RIGHT_HALF[..., 2:] = 1  # 1 = fill


class CorrelatedGaussian:
    """N(0, a I + b 11^T) in 16-D: every pixel shares one brightness, so the known half says much
    about the unknown half. Exact denoiser E[x0 | x] = S (S + sigma^2 I)^-1 x and exact conditional."""

    def __init__(self, a=0.05, b=0.5):
        self.cov = a * torch.eye(16, dtype=torch.float64) + b * torch.ones(16, 16, dtype=torch.float64)

    def denoiser(self, x, sigma, **cond):
        assert (sigma == sigma[0]).all()  # one level per call under the sampler contract
        gain = self.cov @ torch.linalg.inv(self.cov + float(sigma[0]) ** 2 * torch.eye(16, dtype=torch.float64))
        return (x.to(torch.float64).reshape(len(x), 16) @ gain.T).reshape(x.shape).to(x.dtype)

    def conditional(self, known: torch.Tensor, fill: torch.Tensor):
        """Mean and covariance of the fill pixels given the known ones (Gaussian conditioning)."""
        k, u = ~fill, fill
        s_uk = self.cov[u][:, k]
        gain = s_uk @ torch.linalg.inv(self.cov[k][:, k])
        return gain @ known.to(torch.float64), self.cov[u][:, u] - gain @ s_uk.T


def _stats(out, fill):
    u = out.flatten(1)[:, fill].to(torch.float64)
    return u.mean(0), torch.cov(u.T)


@pytest.mark.parametrize("sampler, steps, jump, resample", [
    ("ddpm", 50, 5, 5), ("euler_ancestral", 30, 3, 5), ("euler", 30, 3, 5), ("ddim", 30, 3, 5), ("dpmpp_2m", 30, 3, 5),
])
def test_repaint_follows_the_exact_conditional_and_replace_does_not(sampler, steps, jump, resample):
    gauss = CorrelatedGaussian()
    image = torch.full((500, *SHAPE), 1.5)  # about two prior standard deviations bright
    fill = RIGHT_HALF.flatten().bool()
    mean, cov = gauss.conditional(image[0].flatten()[~fill], fill)
    got_mean, got_cov = _stats(inpaint(gauss.denoiser, SCHED, image, RIGHT_HALF, sampler=sampler, steps=steps,
                                       jump_length=jump, resample=resample, seed=0), fill)
    err = (got_mean - mean).abs().mean()
    assert err < 0.07
    assert float(got_cov.diag().mean()) == pytest.approx(float(cov.diag().mean()), rel=0.3)
    off = ~torch.eye(8, dtype=torch.bool)
    assert (got_cov[off] - cov[off]).abs().mean() < 0.01
    # the baseline pulls the fill towards the prior mean (the known pixels are mostly noise when the
    # fill's brightness is decided); RePaint's resampling lets it catch up
    replaced, _ = _stats(inpaint(gauss.denoiser, SCHED, image, RIGHT_HALF, method="replace", sampler=sampler,
                                 steps=steps, seed=0), fill)
    assert (replaced - mean).abs().mean() > max(0.15, 3 * err)


def test_repaint_keeps_a_multimodal_fill_in_the_mode_the_known_half_implies():
    mixture = GaussianMixture([[1.0] * 16, [-1.0] * 16], 0.5)  # the oracle: two modes, no correlation within one
    image = torch.full((400, *SHAPE), 0.5)  # p(mode +1 | known half) = 1 - 1e-14
    fill = RIGHT_HALF.flatten().bool()

    def wrong_mode(method):
        out = inpaint(mixture.denoiser, SCHED, image, RIGHT_HALF, method=method, steps=50, jump_length=5,
                      resample=5, seed=1)
        return float((out.flatten(1)[:, fill].mean(1) < 0).float().mean())

    assert wrong_mode("repaint") < 0.06
    assert wrong_mode("replace") > 0.1


def test_reconstruction_guidance_is_the_gradient_step_in_closed_form():
    """For a linear denoiser D(x) = G x the guided estimate is G x + w G^T (keep * (known - G x))."""
    from diffusekit.pipelines.edit import ReconstructionGuidedDenoiser

    gauss = CorrelatedGaussian()
    known = torch.randn(3, *SHAPE, dtype=torch.float64)
    keep = 1 - RIGHT_HALF.to(torch.float64)
    x = torch.randn(3, *SHAPE, dtype=torch.float64) * 2
    sigma = torch.full((3,), 1.7, dtype=torch.float64)
    gain = gauss.cov @ torch.linalg.inv(gauss.cov + 1.7**2 * torch.eye(16, dtype=torch.float64))
    flat = x.reshape(3, 16)
    residual = (keep.reshape(1, 16) * (known.reshape(3, 16) - flat @ gain.T))
    expected = flat @ gain.T + 4.0 * residual @ gain
    got = ReconstructionGuidedDenoiser(gauss.denoiser, known, keep, 4.0)(x, sigma)
    torch.testing.assert_close(got.reshape(3, 16), expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # samplers run without autograd; the guidance turns it on for itself
        torch.testing.assert_close(ReconstructionGuidedDenoiser(gauss.denoiser, known, keep, 4.0)(x, sigma), got)


def test_reconstruction_guidance_puts_the_fill_in_the_mode_the_known_half_implies():
    mixture = GaussianMixture([[1.0] * 16, [-1.0] * 16], 0.5)
    image = torch.full((400, *SHAPE), 0.5)
    fill = RIGHT_HALF.flatten().bool()
    out = inpaint(mixture.denoiser, SCHED, image, RIGHT_HALF, method="replace", steps=50, seed=1, reconstruction=3.0)
    assert float((out.flatten(1)[:, fill].mean(1) < 0).float().mean()) < 0.02  # replace alone: > 0.1 (above)
    assert torch.equal(out.flatten(1)[:, ~fill], image.flatten(1)[:, ~fill])
    with pytest.raises(ValueError, match="reconstruction .* >= 0"):
        inpaint(mixture.denoiser, SCHED, image, RIGHT_HALF, reconstruction=-1.0)


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m", "ddim", "heun", "unipc", "dpmpp_sde",
                                     "dpm_adaptive"])
@pytest.mark.parametrize("method", ["repaint", "replace"])
def test_known_pixels_exact_seeds_reproduce_batches_independent(sampler, method):
    mixture = GaussianMixture.random(16, 3, seed=2, spread=1.0)
    image = mixture.sample(5, torch.Generator().manual_seed(0)).float().reshape(5, *SHAPE)
    mask = (torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    kw = dict(method=method, sampler=sampler, steps=6, jump_length=2, resample=2, seed=3)
    out = inpaint(mixture.denoiser, SCHED, image, mask, **kw)
    assert out.shape == image.shape and torch.isfinite(out).all()
    assert torch.equal(out[mask == 0], image[mask == 0])
    assert torch.equal(out, inpaint(mixture.denoiser, SCHED, image, mask, **kw))
    if sampler != "dpm_adaptive":  # it sizes its steps for the whole batch (see its docstring)
        assert torch.equal(out[3:], inpaint(mixture.denoiser, SCHED, image, mask, batch_size=2, **kw)[3:])
    other = inpaint(mixture.denoiser, SCHED, image, mask, **{**kw, "seed": 4})
    assert not torch.equal(out[mask == 1], other[mask == 1])


def test_the_step_by_step_driver_is_the_plain_sampler_and_multistep_restarts_as_euler():
    mixture = GaussianMixture.random(16, 3, seed=2, spread=1.0)
    image = torch.zeros(4, *SHAPE)
    everything = torch.ones(1, *SHAPE)
    for sampler in ("euler_ancestral", "heun"):  # single-step samplers: identical to one plain run
        plain = generate(mixture.denoiser, SCHED, SHAPE, 4, seed=7, sampler=sampler, steps=8)
        assert torch.equal(inpaint(mixture.denoiser, SCHED, image, everything, method="replace", sampler=sampler,
                                   steps=8, seed=7), plain)
    # multistep samplers start afresh on every interval: their first step is Euler's
    mask = RIGHT_HALF.expand(4, *SHAPE)
    euler = inpaint(mixture.denoiser, SCHED, image, mask, sampler="euler", steps=8, jump_length=2, resample=3, seed=7)
    for sampler in ("dpmpp_2m", "lms", "unipc"):
        torch.testing.assert_close(inpaint(mixture.denoiser, SCHED, image, mask, sampler=sampler, steps=8,
                                           jump_length=2, resample=3, seed=7), euler, atol=1e-5, rtol=0)


def test_conditioning_and_guidance_reach_the_denoiser_per_batch():
    mixture = GaussianMixture.random(16, 2, seed=0)
    seen = []

    def denoiser(x, sigma, class_labels):  # guidance batches cond and uncond into one call
        seen.append(class_labels.tolist())
        return mixture.denoiser(x, sigma) + 0.01 * class_labels.reshape(-1, 1, 1, 1)

    image, labels = torch.zeros(3, *SHAPE), torch.tensor([4, 5, 6])
    kw = dict(cond={"class_labels": labels}, uncond={"class_labels": torch.tensor([9])}, guidance=2.0, batch_size=2)
    inpaint(denoiser, SCHED, image, RIGHT_HALF, method="replace", steps=2, **kw)
    assert seen[0] == [4, 5, 9, 9] and seen[-1] == [6, 9]
    seen.clear()
    img2img(denoiser, SCHED, image, strength=0.5, steps=2, sampler="euler", **kw)
    assert seen == [[4, 5, 9, 9], [6, 9]]
    with pytest.raises(ValueError, match="batch 2"):
        img2img(denoiser, SCHED, image, cond={"class_labels": labels[:2]})


def test_resample_one_is_replace():
    mixture = GaussianMixture.random(16, 3, seed=2)
    image, mask = torch.zeros(3, *SHAPE), RIGHT_HALF
    kw = dict(sampler="ddpm", steps=6, seed=5)
    assert torch.equal(inpaint(mixture.denoiser, SCHED, image, mask, method="repaint", resample=1, **kw),
                       inpaint(mixture.denoiser, SCHED, image, mask, method="replace", **kw))


def test_repaint_path():
    # jumps at the last nonzero level (5) and every 2 above it where a full jump fits (3), once each
    assert repaint_path(6, 2, 2) == [0, 1, 2, 3, 1, 2, 3, 4, 5, 3, 4, 5, 6]
    assert repaint_path(6, 2, 1) == list(range(7))
    path = repaint_path(50, 10, 10)  # RePaint's setting: 4 jump points, 9 jumps of 10 each
    assert path[0] == 0 and path[-1] == 50 and sum(b > a for a, b in zip(path, path[1:])) == 50 + 4 * 9 * 10
    assert all(b == a + 1 or b == a - 10 for a, b in zip(path, path[1:]))
    with pytest.raises(ValueError, match="jump_length"):
        repaint_path(8, 10, 10)


class Spy:
    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, []

    def __call__(self, x, sigma, **cond):
        self.calls.append((float(sigma[0]), x.clone()))
        return self.denoiser(x, sigma, **cond)


@pytest.mark.parametrize("steps, strength, skipped", [(10, 0.6, 4), (100, 0.57, 43), (10, 1.0, 0), (10, 0.01, 9)])
def test_img2img_starts_where_strength_enters_the_schedule(steps, strength, skipped):
    mixture = GaussianMixture.random(16, 3, seed=2)
    image = mixture.sample(3, torch.Generator().manual_seed(0)).float().reshape(3, *SHAPE)
    spy = Spy(mixture.denoiser)
    img2img(spy, SCHED, image, strength=strength, sampler="euler", steps=steps, seed=9)
    full = SCHED.get_sigmas(steps, "karras")
    assert torch.equal(img2img_sigmas(full, strength), full[skipped:])
    assert [s for s, _ in spy.calls] == pytest.approx(full[skipped:-1].tolist(), rel=1e-6)
    if skipped:  # the exact forward sample x0 + sigma eps, from the seed's start stream
        start = image + float(full[skipped]) * randn_like(image, seeded_generators(9, 3))
        torch.testing.assert_close(spy.calls[0][1], start)


def test_img2img_strength_one_is_generate_and_small_strength_keeps_the_input():
    mixture = GaussianMixture.random(16, 3, seed=2, spread=1.0)
    image = mixture.sample(64, torch.Generator().manual_seed(0)).float().reshape(64, *SHAPE)
    plain = generate(mixture.denoiser, SCHED, SHAPE, 64, seed=4, sampler="euler_ancestral", steps=10)
    assert torch.equal(img2img(mixture.denoiser, SCHED, image, strength=1.0, sampler="euler_ancestral", steps=10,
                               seed=4), plain)
    changes = [float((img2img(mixture.denoiser, SCHED, image, strength=s, steps=20, seed=4) - image).abs().mean())
               for s in (0.05, 0.5, 1.0)]
    assert changes[0] < 0.02  # one step from sigma_min = 0.01
    assert changes[0] < changes[1] < changes[2]


def test_bad_inputs_raise_value_errors():
    mixture = GaussianMixture.random(16, 2, seed=0)
    d, image = mixture.denoiser, torch.zeros(2, *SHAPE)
    with pytest.raises(ValueError, match="mask shape"):
        inpaint(d, SCHED, image, torch.ones(2, 1, 4, 3), steps=4, jump_length=2)
    with pytest.raises(ValueError, match="mask shape"):
        inpaint(d, SCHED, image, torch.ones(3, *SHAPE), steps=4, jump_length=2)
    with pytest.raises(ValueError, match="only 0"):
        inpaint(d, SCHED, image, torch.full((2, *SHAPE), 0.5), steps=4, jump_length=2)
    with pytest.raises(ValueError, match="unknown inpainting method"):
        inpaint(d, SCHED, image, RIGHT_HALF, method="blend", steps=4)
    with pytest.raises(ValueError, match="unknown sampler"):
        inpaint(d, SCHED, image, RIGHT_HALF, sampler="nope", steps=4)
    with pytest.raises(ValueError, match="jump_length"):
        inpaint(d, SCHED, image, RIGHT_HALF, steps=4)  # default jump 10 does not fit 4 steps
    with pytest.raises(ValueError, match="uncond"):
        inpaint(d, SCHED, image, RIGHT_HALF, steps=4, method="replace", guidance=3.0)
    assert torch.equal(img2img(d, SCHED, image, strength=0, steps=5), image)  # nothing runs
    for strength in (1.5, -0.2, float("nan")):
        with pytest.raises(ValueError, match="strength"):
            img2img(d, SCHED, image, strength=strength)
    with pytest.raises(ValueError, match="NaN"):
        img2img(d, SCHED, torch.full((1, *SHAPE), float("nan")))
    with pytest.raises(ValueError, match="steps"):
        img2img(d, SCHED, image, steps=0)


# -- the command line ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from diffusekit.train import TrainConfig, train

    out = tmp_path_factory.mktemp("edit") / "run"
    return train(TrainConfig(out=str(out), steps=2, batch_size=8, checkpoint_every=2, sample_every=1000,
                             num_samples=4, sample_steps=2), progress=False)


def _cli(argv):
    parser = argparse.ArgumentParser(prog="diffusekit")
    add_edit_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    args.run(args)


def _png(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8), "L").save(path)
    return path


def test_cli_round_trip_keeps_the_known_pixels(run, tmp_path, capsys):
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8))
    source = _png(tmp_path / "in.png", pixels)
    mask = np.zeros((8, 8))
    mask[2:6, 2:6] = 255
    mask_png = _png(tmp_path / "mask.png", mask)
    _cli(["inpaint", run, "--image", source, "--mask", mask_png, "-o", tmp_path / "out.png",
          "--steps", 4, "--jump-length", 2, "--resample", 2])
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert out.shape == (8, 8)
    assert np.array_equal(out[mask == 0], pixels[mask == 0])
    assert "reconstruction guidance 20," in capsys.readouterr().out  # on by default for runs

    _cli(["img2img", run, "--image", source, "--strength", 0.5, "--steps", 4, "-o", tmp_path / "i2i.png"])
    assert np.asarray(Image.open(tmp_path / "i2i.png")).shape == (8, 8)

    # a grey mask is thresholded at half, with a note
    soft = _png(tmp_path / "soft.png", mask * 0.8)
    _cli(["inpaint", run, "--image", source, "--mask", soft, "-o", tmp_path / "soft_out.png", "--method", "replace",
          "--steps", 3, "--reconstruction", 0])
    captured = capsys.readouterr()
    assert "pixels >= 128 count as fill" in captured.err and "reconstruction guidance 0," in captured.out
    assert np.array_equal(np.asarray(Image.open(tmp_path / "soft_out.png"))[mask == 0], pixels[mask == 0])


def test_cli_input_errors(run, tmp_path, capsys):
    big = _png(tmp_path / "big.png", np.zeros((16, 16)))
    mask = _png(tmp_path / "mask.png", np.full((8, 8), 255))
    common = ["-o", tmp_path / "out.png", "--steps", 3, "--method", "replace"]
    with pytest.raises(ValueError, match="16x16.*8x8.*--resize"):
        _cli(["inpaint", run, "--image", big, "--mask", mask, *common])
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="cannot read image"):
        _cli(["img2img", run, "--image", tmp_path / "bad.png", "-o", tmp_path / "out.png"])
    small = _png(tmp_path / "small.png", np.zeros((8, 8)))
    with pytest.raises(ValueError, match="mask .* is 16x16"):
        _cli(["inpaint", run, "--image", small, "--mask", big, *common])
    black = _png(tmp_path / "black.png", np.zeros((8, 8)))
    with pytest.raises(ValueError, match="all black"):
        _cli(["inpaint", run, "--image", small, "--mask", black, *common])
    with pytest.raises(ValueError, match="unconditional"):
        _cli(["img2img", run, "--image", small, "--class", 3, "-o", tmp_path / "out.png"])
    assert not (tmp_path / "out.png").exists()
    _cli(["inpaint", run, "--image", big, "--mask", _png(tmp_path / "m16.png", np.full((16, 16), 255)), "--resize",
          *common])
    assert Image.open(tmp_path / "out.png").size == (8, 8)


def test_cli_main_wires_the_edit_commands(run, tmp_path, capsys):
    from diffusekit.cli import build_parser, main

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    if "inpaint" not in commands:
        pytest.skip("cli.py does not call add_edit_parsers yet")
    source = _png(tmp_path / "in.png", np.zeros((8, 8)))
    assert main(["img2img", str(run), "--image", str(source), "--strength", "2", "-o", str(tmp_path / "o.png")]) == 2
    assert capsys.readouterr().err.strip().endswith("strength must lie in [0, 1] (0 returns the input, 1 ignores it), got 2.0")
