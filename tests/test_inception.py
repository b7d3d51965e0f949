"""The FID Inception network: parity with pytorch-fid, loading and its errors, FID/KID in `diffusekit eval`.

pytorch-fid needs torchvision, which does not import here, so its side was recorded once
(`data/make_fid_inception_reference.py`): its state dict's keys and shapes, and its pool3
features of four fixed images with made-up weights that both sides compute bit for bit.
"""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusekit import evaluate as ev
from diffusekit.evaluate import add_eval_parser
from diffusekit.metrics import FIDInceptionV3, inception_features, kernel_inception_distance, load_inception
from diffusekit.train import TrainConfig, load, train

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "fid_inception_reference.safetensors"


def _maker():
    path = DATA / "make_fid_inception_reference.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKER = _maker()


@pytest.fixture(scope="module")
def reference():
    with safe_open(str(REFERENCE), "pt") as f:
        meta = f.metadata()
    return load_file(str(REFERENCE)), meta, {k: tuple(s) for k, s in json.loads(meta["keys"])}


@pytest.fixture(scope="module")
def weights(reference):
    """The made-up weights pytorch-fid's features were recorded with (same bits: the digest matches)."""
    sd = MAKER.random_state_dict(reference[2], int(reference[1]["seed"]))
    assert MAKER.state_dict_digest(sd) == reference[1]["weights_sha256"]
    return sd


@pytest.fixture(scope="module")
def weights_file(weights, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(weights, path)  # a plain state dict, as pytorch-fid's file is
    return path


@pytest.fixture(scope="module")
def net(weights_file):
    return load_inception(weights_file)


def test_keys_and_shapes_are_pytorch_fids(reference):
    with torch.device("meta"):
        ours = FIDInceptionV3().state_dict()
    assert [(k, tuple(v.shape)) for k, v in ours.items()] == list(reference[2].items())
    assert reference[2]["fc.weight"] == (1008, 2048)


def test_features_match_pytorch_fid(net, reference):
    features = reference[0]
    for side, images in MAKER.reference_images().items():
        ref = features[f"features_{side}"]
        ours = inception_features(images, net, batch_size=1 if side == 32 else 50)
        assert ours.shape == ref.shape == (2, 2048) and ours.dtype == torch.float32
        assert ref.std() > 1 and (ref > 0).double().mean() > 0.5  # the made-up weights keep every layer alive
        assert (ref[0] - ref[1]).abs().max() > 1e-2 * ref.abs().max()  # and the two images apart
        assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max(), side
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_grey_is_rgb_repeated_and_inputs_are_checked(net):
    grey = MAKER.reference_images()[32][:1, :1]
    torch.testing.assert_close(inception_features(grey, net), inception_features(grey.expand(-1, 3, -1, -1), net))
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        inception_features(grey * 127.5 + 127.5, net)
    with pytest.raises(ValueError, match="grey or RGB"):
        inception_features(torch.zeros(1, 4, 8, 8), net)
    assert inception_features(torch.zeros(0, 3, 8, 8), net).shape == (0, 2048)


def test_pth_and_safetensors_load_the_same_network(weights, weights_file, net, tmp_path):
    expected = {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    assert not net.training and net.fc is not None
    # an old-style file: no BatchNorm counters, no classifier, extra keys of other heads; safetensors
    lean = {k: v for k, v in expected.items() if not k.startswith("fc.")}
    lean["AuxLogits.fc.weight"] = torch.zeros(3)
    save_file(lean, str(tmp_path / "lean.safetensors"))
    other = load_inception(tmp_path / "lean.safetensors")
    assert other.fc is None
    loaded = other.state_dict()
    assert set(lean) - set(loaded) == {"AuxLogits.fc.weight"}
    assert all(torch.equal(loaded[k], v) for k, v in lean.items() if k in loaded)
    with pytest.raises(ValueError, match="no classifier"):
        other.logits(torch.zeros(1, 2048))
    assert net.logits(torch.zeros(1, 2048)).shape == (1, 1008)


class NotATensor:
    pass


def test_bad_weight_files_are_one_line_errors(weights, tmp_path):
    missing = dict(weights)
    del missing["Mixed_6c.branch7x7_2.conv.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    wrong = dict(weights, **{"Mixed_7c.branch_pool.bn.running_var": torch.ones(7)})
    torch.save(wrong, tmp_path / "wrong.pth")
    torch.save({"x": NotATensor()}, tmp_path / "pickle.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    torch.save({"conv.weight": torch.zeros(4, 1, 3, 3)}, tmp_path / "other.pt")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    cases = [
        ("missing.pth", ValueError, "'Mixed_6c.branch7x7_2.conv.weight' is missing"),
        ("wrong.pth", ValueError, r"'Mixed_7c.branch_pool.bn.running_var' has shape \(7,\).*needs \(192,\)"),
        ("pickle.pth", ValueError, "does not unpickle"),
        ("list.pth", ValueError, "not a state dict"),
        ("other.pt", ValueError, "not the FID Inception network's weights"),
        ("junk.pth", ValueError, "cannot read"),
        ("junk.safetensors", ValueError, "cannot read"),
        ("absent.pth", FileNotFoundError, "never downloads"),
    ]
    for name, error, message in cases:
        with pytest.raises(error, match=message) as caught:
            load_inception(tmp_path / name)
        text = str(caught.value)
        assert "\n" not in text and "pt_inception-2015-12-05-6726825d.pth" in text, name


# -- FID and KID in `diffusekit eval` --------------------------------------------------------------

TINY = dict(steps=2, batch_size=8, checkpoint_every=2, sample_every=1000, num_samples=4, sample_steps=2, log_every=1,
            warmup_steps=2)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    return train(TrainConfig(out=str(tmp_path_factory.mktemp("eval") / "digits"), **TINY), progress=False)


def _cli(argv):
    parser = argparse.ArgumentParser(prog="diffusekit")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    args.run(args)


def test_eval_adds_fid_and_kid_and_caches_the_real_features(digits_run, weights_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    _cli([str(digits_run), "--n", "8", "--steps", "2", "--sweep", "none", "--out", str(out),
          "--inception-weights", str(weights_file), "--inception-reference", "8"])
    assert "FID: " in capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())
    m = result["metrics"]
    assert result["evaluation"] == "digits" and m["fd_digits"] >= 0  # the digit metrics stay
    assert m["fid"] > 0 and m["kid"] > 0 and m["kid_std"] >= 0
    assert 0 <= m["inception_precision"] <= 1 and 0 <= m["inception_recall"] <= 1
    assert m["inception_n"] == 8 and m["inception_reference_n"] == 8
    assert result["settings"]["inception_weights"] == str(weights_file)
    assert any("FID and KID" in note for note in result["notes"])
    page = (out / "report.html").read_text()
    assert "<td>FID</td>" in page and "<td>KID</td>" in page and "recall (Inception)" in page

    cached = list((digits_run / "inception-cache").glob("digits-8px-8-*.safetensors"))
    assert len(cached) == 1
    real = load_file(str(cached[0]))["features"]
    assert real.shape == (8, 2048)
    # KID's estimator takes its two sets as independent draws, so one set against itself scores
    # (2/n)(mean off-diagonal - mean diagonal kernel value) <= 0, which -> 0 as n grows
    same, _ = kernel_inception_distance(real, real, num_subsets=10)
    assert same <= 0 < m["kid"]

    # asked again, the real features come from the cache, without running the network
    import diffusekit.metrics.inception as inception

    def no_network(*args, **kwargs):
        raise AssertionError("the cached real features were recomputed")

    monkeypatch.setattr(inception, "inception_features", no_network)
    again = ev.reference_inception_features(load(digits_run), None, weights_file, 8, digits_run / "inception-cache")
    assert torch.equal(again, real)


def test_eval_checks_inception_options_before_any_work(digits_run, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="never downloads"):
        _cli([str(digits_run), "--n", "8", "--out", str(out), "--inception-weights", str(tmp_path / "nope.pth")])
    with pytest.raises(ValueError, match="--inception-reference must be >= 4"):
        _cli([str(digits_run), "--n", "8", "--out", str(out), "--inception-weights", "x.pth",
              "--inception-reference", "3"])
    assert not out.exists()
