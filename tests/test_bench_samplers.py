"""`diffusekit bench samplers` end to end on a tiny setting: the table, the counted NFE, the
skipped combinations, the CSV and the plot, with and without the peers."""

import csv
import importlib.util
import json
import math

import pytest
import torch
from PIL import Image

from diffusekit.bench.samplers import ratio_interval, run
from diffusekit.cli import main
from diffusekit.schedule_opt import Calibration, SolverFit

TINY = Calibration(num_samples=32, reference_steps=40, max_runs=40, dtype=torch.float64)
TINY_FIT = SolverFit(num_samples=64, batch_size=32, reference_steps=40, iterations=10, validate_every=5, start=TINY,
                     dtype=torch.float64)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _row(rows, family, method, schedule, nfe):
    key = (family, method, schedule, str(nfe))
    (row,) = [r for r in rows if (r["family"], r["method"], r["schedule"], r["nfe"]) == key]
    return row


def _peers_available():
    if importlib.util.find_spec("diffusers") is None or importlib.util.find_spec("k_diffusion") is None:
        pytest.skip("peers (diffusers, k-diffusion) are not installed")


def test_bench_without_peers(tmp_path):
    log = []
    results = run(mixtures=["2d"], nfes=[5, 10], samples=64, samplers=["dpmpp_2m", "heun"],
                  spacings=["karras", "optimised"], opt_samplers=["dpmpp_2m"], calibration=TINY,
                  fit_nfes=[5], fit=TINY_FIT, out_dir=tmp_path, log=log.append)
    text = "\n".join(log)
    rows = _rows(tmp_path / "samplers.csv")
    assert len(rows) == len(results) and {r["family"] for r in rows} == {"diffusekit"}
    for nfe in (5, 10):
        for schedule in ("karras", "optimised"):
            row = _row(rows, "diffusekit", "dpmpp_2m", schedule, nfe)
            assert int(row["steps"]) == nfe  # one evaluation per step, counted in the run
            assert 0 < float(row["rmse"]) < 10 and math.isfinite(float(row["sw"]))
        # on this multi-modal mixture Karras spends its steps at low noise; the fitted schedule does not
        assert float(_row(rows, "diffusekit", "dpmpp_2m", "optimised", nfe)["rmse"]) < \
            float(_row(rows, "diffusekit", "dpmpp_2m", "karras", nfe)["rmse"])
    assert _row(rows, "diffusekit", "heun", "karras", 5)["steps"] == "3"  # 2 * 3 - 1 evaluations
    skipped = _row(rows, "diffusekit", "heun", "karras", 10)
    assert skipped["steps"] == "" and "cannot meet NFE 10" in skipped["note"]
    assert "skipped diffusekit heun at NFE 10: cannot meet NFE 10 (NFE 9 with 5 steps, NFE 11 with 6 steps)" in text
    assert "optimised schedule for dpmpp_2m at NFE 5: calibration" in text
    fitted = _row(rows, "diffusekit", "fitted", "fitted", 5)  # fitted at NFE 5 only, as asked
    assert int(fitted["steps"]) == 5 and 0 < float(fitted["rmse"]) < 10
    assert not [r for r in rows if r["method"] == "fitted" and r["nfe"] == "10"]
    assert "fitted solver at NFE 5: fit " in text
    assert "best peer" not in text  # no peers, no ratios
    image = Image.open(tmp_path / "samplers.png")
    assert image.size[0] > 300 and image.size[1] > 300


def test_bench_with_peers(tmp_path):
    """Peers run from the same noise on the same eps network: diffusers' Euler with trailing
    timesteps and k-diffusion's LMS with Karras sigmas walk the same sigmas as ours, so their
    errors agree with ours; the ratio lines compare the best of each side."""
    _peers_available()
    log = []
    run(mixtures=["2d"], nfes=[5, 10], samples=64, samplers=["euler", "lms"], spacings=["karras", "trailing"],
        opt_samplers=[], fit_nfes=[], peers=["Euler", "lms"], out_dir=tmp_path, log=log.append)
    text = "\n".join(log)
    rows = _rows(tmp_path / "samplers.csv")
    assert {r["family"] for r in rows} == {"diffusekit", "diffusers", "k-diffusion"}
    for nfe in (5, 10):
        ours = float(_row(rows, "diffusekit", "euler", "trailing", nfe)["rmse"])
        theirs = _row(rows, "diffusers", "Euler", "trailing", nfe)
        assert int(theirs["steps"]) == nfe and float(theirs["rmse"]) == pytest.approx(ours, rel=1e-3)
        ours = float(_row(rows, "diffusekit", "lms", "karras", nfe)["rmse"])
        theirs = _row(rows, "k-diffusion", "lms", "karras", nfe)
        assert float(theirs["rmse"]) == pytest.approx(ours, rel=1e-3)
    assert "ratios (2d):" in text
    assert text.count("ratio best diffusekit / best peer RMSE = ") == 2 and text.count("(90% bootstrap ") == 2
    assert "sample_errors" not in rows[0]
    assert (tmp_path / "samplers.png").stat().st_size > 0


def test_cli_with_a_user_mixture(tmp_path, capsys):
    spec = tmp_path / "three.json"
    spec.write_text(json.dumps({"means": [[-1.5, 0.0, 0.5], [1.0, 1.0, -1.0], [0.0, -2.0, 0.0]],
                                "stds": [0.2, 0.4, 0.3], "weights": [1, 2, 1]}))
    out = tmp_path / "out"
    assert main(["bench", "samplers", "--mixture", str(spec), "--nfe", "5", "--samples", "32",
                 "--samplers", "unipc:order=3", "--spacings", "karras", "exponential", "--opt-samplers",
                 "--fit-nfe", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "== three: 3-D, 3 components" in printed
    rows = _rows(out / "samplers.csv")
    assert {(r["mixture"], r["method"], r["schedule"]) for r in rows} == {
        ("three", "unipc:order=3", "karras"), ("three", "unipc:order=3", "exponential")}
    assert (out / "samplers.png").exists()


@pytest.mark.parametrize("args,message", [
    (["--samplers", "nope"], "unknown sampler 'nope'; valid (fixed NFE): "),
    (["--spacings", "optimized"], "unknown spacing 'optimized'; valid: karras, exponential"),
    (["--mixture", "random:8"], "expected random:DIM:COMPONENTS:SEED"),
    (["--mixture", "missing.json"], "unknown mixture 'missing.json'; valid: 2d, 64d"),
    (["--opt-samplers", "euler_ancestral", "--samplers", "euler_ancestral"], "needs a deterministic sampler"),
    (["--samplers", "unipc:order"], "bad option 'order'"),
    (["--samplers", "euler", "--opt-samplers", "lms"], "--opt-samplers 'lms' is not among the samplers run (euler)"),
    (["--fit-nfe", "7"], "--fit-nfe [7] is not among the NFE values run ([5])"),
    (["--calibration-mining", "-1"], "mining must be a non-negative integer, got -1"),
])
def test_cli_bad_input(args, message, tmp_path, capsys):
    assert main(["bench", "samplers", "--nfe", "5", "--samples", "8", "-o", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffusekit bench: error: ") and message in err
    assert not (tmp_path / "samplers.csv").exists()


def test_cli_unknown_peer_lists_the_valid_ones(tmp_path, capsys):
    _peers_available()
    args = ["bench", "samplers", "--nfe", "5", "--samples", "8", "--peers", "DPM++9M", "-o", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "unknown peer DPM++9M; valid: Euler, Heun" in err and "dpmpp_3m_sde(eta=0)" in err


def test_ratio_interval_closed_forms():
    """Paired bootstrap of RMSE(ours) / RMSE(peer): a constant per-sample ratio is the interval
    itself; one sample carrying all of our error makes the interval wide (it is in or out of a
    resample), and it lies around the full-sample ratio."""
    peer = torch.rand(300, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    low, high = ratio_interval(0.25 * peer, peer)
    assert low == pytest.approx(0.5) and high == pytest.approx(0.5)
    ours = torch.full((300,), 1e-4, dtype=torch.float64)
    ours[7] = 300.0  # one mode switch
    full = float((ours.mean() / peer.mean()).sqrt())
    low, high = ratio_interval(ours, peer)
    assert low < 0.6 * full and full < high and high < 2 * full
    assert all(math.isnan(v) for v in ratio_interval(None, peer))
