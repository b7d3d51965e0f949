"""Autoencoder training and latent diffusion: exact resume, logged metrics, the scale factor, the
self-contained latent run, and clear errors. Tiny configs: 16x16 digits -> 4x4x4 latents."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusekit.cli import main
from diffusekit.data import ShapesDataset, load_dataset
from diffusekit.train import AutoencoderTrainConfig, TrainConfig, load, load_autoencoder, train, train_autoencoder
from diffusekit.train.latent import LatentData, decode_latents

# device cpu: the trainer takes CUDA when there is one, and these tests check CPU facts (bit-exact resume)
AE_FAST = dict(data="digits", resolution=16, batch_size=8, checkpoint_every=3, sample_every=1000, num_samples=4,
               log_every=2, warmup_steps=2, disc_channels=16, lr_schedule="constant", device="cpu")
LD_FAST = dict(data="digits", resolution=16, batch_size=8, checkpoint_every=2, sample_every=1000, num_samples=4,
               sample_steps=2, log_every=2, warmup_steps=2, lr_schedule="constant", device="cpu")


def _states(run: Path) -> tuple[dict, dict, dict]:
    folder = run / (run / "latest").read_text().strip()
    state = torch.load(folder / "train_state.pt", weights_only=True)
    return state["model"], load_file(str(folder / "model.safetensors")), state["job"]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    """A digits autoencoder (16x16x1 -> 4x4x4), trained a little."""
    out = tmp_path_factory.mktemp("ae") / "ae"
    return train_autoencoder(AutoencoderTrainConfig(out=str(out), steps=20, lr=3e-3, **AE_FAST), progress=False)


def test_train_autoencoder_resumes_exactly_with_the_gan_on(tmp_path):
    # the discriminator switches on at step 2, before the interruption at 3: its weights and
    # optimizer must travel through train_state.pt too
    cfg = dict(disc_start=2, **AE_FAST)
    straight = train_autoencoder(AutoencoderTrainConfig(out=str(tmp_path / "a"), steps=6, **cfg), progress=False)
    half = train_autoencoder(AutoencoderTrainConfig(out=str(tmp_path / "b"), steps=3, **cfg), progress=False)
    torch.manual_seed(99)  # other global draws in between must not matter
    resumed = train_autoencoder(AutoencoderTrainConfig(out=str(half), steps=6, **cfg), resume=True, progress=False)
    model_a, ema_a, job_a = _states(straight)
    model_b, ema_b, job_b = _states(resumed)
    assert _equal(model_a, model_b) and _equal(ema_a, ema_b)
    assert _equal(job_a["discriminator"], job_b["discriminator"])
    log = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 3, 4, 6]  # 3: the end of the interrupted run
    for r in log:
        assert np.isfinite(r["psnr"]) and r["psnr"] > 0 and np.isfinite(r["latent_std"]) and r["latent_std"] > 0
    assert "d_loss" not in log[0] and "d_loss" in log[1] and "g_weight" in log[2]  # the GAN starts at step 2
    config = json.loads((resumed / (resumed / "latest").read_text().strip() / "config.json").read_text())
    assert config["model"]["type"] == "autoencoder" and config["model"]["config"]["in_channels"] == 1
    assert Image.open(resumed / "samples.png").size[0] > 0  # images over their reconstructions


def test_autoencoder_training_reduces_the_reconstruction_error(autoencoder):
    log = [json.loads(line) for line in (autoencoder / "log.jsonl").read_text().splitlines()]
    assert log[-1]["psnr"] > log[0]["psnr"] + 3  # dB: it learns, the PSNR is measured on the right scale


def test_autoencoder_trains_on_crops_and_encodes_whole_images(tmp_path, monkeypatch):
    from diffusekit.train.autoencoder import AutoencoderJob

    seen = []
    original = AutoencoderJob.loss

    def spy(self, batch, part):
        seen.append(tuple(batch["x"][part].shape))
        return original(self, batch, part)

    monkeypatch.setattr(AutoencoderJob, "loss", spy)
    run = train_autoencoder(AutoencoderTrainConfig(out=str(tmp_path / "ae"), steps=4, crop=8, whole_after=0.5,
                                                   **AE_FAST), progress=False)
    monkeypatch.undo()
    # crops for the first half of the budget, whole images after it
    assert [shape[-2:] for shape in seen] == [(8, 8)] * 2 + [(16, 16)] * 2
    ae, _ = load_autoencoder(run)
    assert ae.encode(torch.zeros(2, 1, 16, 16)).mean.shape == (2, 4, 4, 4)  # whole images afterwards
    for crop in (6, 32):  # not a multiple of the factor 4; larger than the 16px images
        with pytest.raises(ValueError, match=f"--crop {crop}: must be a multiple"):
            train_autoencoder(AutoencoderTrainConfig(out=str(tmp_path / f"bad{crop}"), steps=1, crop=crop, **AE_FAST),
                              progress=False)
        assert not (tmp_path / f"bad{crop}").exists()
    for bad, why in (({"whole_after": 0.5}, "only with --crop"), ({"crop": 8, "whole_after": 1.0}, "in \\[0, 1\\)")):
        with pytest.raises(ValueError, match=f"--whole-after: .*{why}"):
            AutoencoderTrainConfig(**bad).validate()


def test_scale_factor_round_trip(autoencoder):
    ae, _ = load_autoencoder(autoencoder)
    data = load_dataset("digits", 16)
    latents = LatentData(data, ae, "cpu")
    assert latents.channels == 4 and latents.resolution == 4 and len(latents) == len(data)
    assert abs(latents.scaling_factor - 1 / latents.raw_std) < 1e-12
    ae.config.scaling_factor = latents.scaling_factor
    # on fresh posterior draws of the data, the scaled latents have unit std ...
    x, _ = data.batch(torch.arange(len(data)))
    z = ae.encode_latents(x, generator=torch.Generator().manual_seed(5))
    assert abs(float(z.std()) - 1.0) < 0.05
    z_raw = ae.encode_latents(x, generator=torch.Generator().manual_seed(5)) / latents.scaling_factor
    assert abs(float(z_raw.std()) - latents.raw_std) < 0.05 * latents.raw_std
    # ... and decode_latents undoes the scaling exactly
    with torch.no_grad():
        z = ae.encode_latents(x[:8], sample=False)
        torch.testing.assert_close(ae.decode_latents(z), ae.decode(ae.encode(x[:8]).mean))
    # the cached latents are the same map
    cached, _ = latents.sample(torch.arange(8))
    torch.testing.assert_close(cached, z, atol=1e-5, rtol=1e-5)


def test_latent_training_resumes_exactly_and_samples_images(autoencoder, tmp_path):
    cfg = dict(autoencoder=str(autoencoder), class_conditional=True, **LD_FAST)
    straight = train(TrainConfig(out=str(tmp_path / "a"), steps=4, **cfg), progress=False)
    half = train(TrainConfig(out=str(tmp_path / "b"), steps=2, **cfg), progress=False)
    resumed = train(TrainConfig(out=str(half), steps=4, **cfg), resume=True, progress=False)
    model_a, ema_a, _ = _states(straight)
    model_b, ema_b, _ = _states(resumed)
    assert _equal(model_a, model_b) and _equal(ema_a, ema_b)

    # the run is self-contained: it samples with the autoencoder folder gone
    moved = tmp_path / "ae-moved"
    shutil.copytree(autoencoder, moved)
    cfg["autoencoder"] = str(moved)
    run = train(TrainConfig(out=str(tmp_path / "c"), steps=2, **cfg), progress=False)
    shutil.rmtree(moved)
    model = load(run)
    config = model.config
    assert config["model"]["config"]["in_channels"] == 4 and config["model"]["config"]["image_size"] == 4
    assert model.sample_shape == (4, 4, 4) and model.image_shape == (1, 16, 16)
    assert config["autoencoder"]["config"]["scaling_factor"] == pytest.approx(1 / config["autoencoder"]["latent_std"])
    assert model.sample_clip is None
    grid, single = tmp_path / "grid.png", tmp_path / "single"
    assert main(["sample", str(run), "--n", "3", "--steps", "2", "--class", "7", "-o", str(grid),
                 "--save-individual", str(single)]) == 0
    images = [np.asarray(Image.open(p)) for p in sorted(single.glob("*.png"))]
    assert len(images) == 3 and all(im.shape == (16, 16) for im in images)  # grey 16x16: decoded, not 4x4 latents
    assert (run / "samples.png").exists()


def test_text_conditioned_latent_diffusion(tmp_path, monkeypatch):
    import diffusekit.train.autoencoder as ae_module
    import diffusekit.train.loop as loop

    small = ShapesDataset(size=16, length=24, cache=True)  # a tiny captioned set stands in for shapes
    monkeypatch.setattr(loop, "load_dataset", lambda *a, **k: small)
    monkeypatch.setattr(ae_module, "load_dataset", lambda *a, **k: small)
    ae = train_autoencoder(AutoencoderTrainConfig(**{**AE_FAST, "data": "shapes", "steps": 2, "out": str(tmp_path / "ae")}),
                           progress=False)
    run = train(TrainConfig(**{**LD_FAST, "data": "shapes", "steps": 2, "out": str(tmp_path / "ld")},
                            autoencoder=str(ae), text_encoder="learned", preset="shapes"), progress=False)
    model = load(run)
    assert model.sample_shape == (4, 4, 4) and model.conditioning_kind == "text"
    from diffusekit.evaluate import Request, draw

    x = draw(model, Request(2, prompts=["a red circle", "a blue square on the left"]), sampler="euler", steps=2,
             spacing="karras", seed=0, guidance=2.0, device="cpu", progress=False)
    assert x.shape == (2, 3, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_bad_inputs_give_one_line_errors(autoencoder, tmp_path, capsys):
    def error(argv) -> str:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    # an autoencoder for grey digits against RGB image folders
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / f"{i}.png")
    assert "takes 1-channel images" in error(["train", "--data", str(folder), "--resolution", "16", "--autoencoder",
                                              str(autoencoder), "--steps", "1", "--out", str(tmp_path / "r1")])
    # a resolution its downsampling factor does not divide
    assert "does not divide" in error(["train", "--data", "digits", "--resolution", "10", "--autoencoder",
                                       str(autoencoder), "--steps", "1", "--out", str(tmp_path / "r2")])
    assert "does not divide" in error(["train-autoencoder", "--data", "digits", "--resolution", "10", "--steps", "1",
                                       "--out", str(tmp_path / "r3")])
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r3").exists()
    # an autoencoder is not a diffusion model, and a pixel diffusion run is not an autoencoder
    assert "is an autoencoder" in error(["sample", str(autoencoder), "-o", str(tmp_path / "g.png")])
    pixel = train(TrainConfig(out=str(tmp_path / "pixel"), steps=1, **LD_FAST), progress=False)
    assert "not an autoencoder" in error(["train", "--data", "digits", "--resolution", "16", "--autoencoder",
                                          str(pixel), "--steps", "1", "--out", str(tmp_path / "r4")])
    assert "no such run" in error(["train", "--data", "digits", "--autoencoder", str(tmp_path / "nothing"),
                                   "--steps", "1", "--out", str(tmp_path / "r5")])
    # decoding latents of the wrong channel count, size or scale
    ae, _ = load_autoencoder(autoencoder)
    with pytest.raises(ValueError, match=r"shape \[B, 4, 4, 4\].*look like images"):
        decode_latents(ae, torch.randn(2, 1, 16, 16), (4, 4, 4))
    with pytest.raises(ValueError, match="decodes 4x4 latents"):
        decode_latents(ae, torch.randn(2, 4, 8, 8), (4, 4, 4))
    with pytest.raises(ValueError, match="std .* unit std"):
        decode_latents(ae, 20 * torch.randn(2, 4, 4, 4), (4, 4, 4))
    assert decode_latents(ae, torch.randn(2, 4, 4, 4), (4, 4, 4)).shape == (2, 1, 16, 16)


def test_a_diffusers_autoencoder_folder_works_as_autoencoder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                                  latent_channels=4, in_channels=1, out_channels=1).eval()
    ref.save_pretrained(tmp_path / "vae")
    ae, info = load_autoencoder(tmp_path / "vae")
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ae.encode(x).mean, ref.encode(x).latent_dist.mean, atol=1e-5, rtol=1e-5)
    assert ae.config.downsampling_factor == 2 and info["step"] is None


def test_inpaint_and_img2img_commands_work_on_latent_runs(autoencoder, tmp_path):
    """The edit commands encode the image, edit its latents (the mask shrunk to the latent grid, any
    latent cell touching the hole repainted) and decode; the known pixels are kept exactly."""
    run = train(TrainConfig(out=str(tmp_path / "ld"), steps=2, autoencoder=str(autoencoder), **LD_FAST),
                progress=False)
    digits = load_dataset("digits", 16)
    image = ((digits.batch(torch.arange(1))[0][0, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "in.png")
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, 8:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert main(["inpaint", str(run), "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                 "--method", "replace", "--steps", "3", "-o", str(tmp_path / "out.png")]) == 0
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert out.shape == (16, 16) and np.array_equal(out[:, :8], image[:, :8])
    assert main(["img2img", str(run), "--image", str(tmp_path / "in.png"), "--strength", "0.5", "--steps", "4",
                 "-o", str(tmp_path / "i2i.png")]) == 0
    assert np.asarray(Image.open(tmp_path / "i2i.png")).shape == (16, 16)
