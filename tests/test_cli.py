import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit import NoiseSchedule
from diffusekit.cli import main
from diffusekit.data import load_digits


def test_forward_writes_a_correct_strip(tmp_path, capsys):
    out = tmp_path / "strip.png"
    assert main(["forward", "-o", str(out), "--index", "5"]) == 0
    assert out.stat().st_mode & 0o044, "outputs are readable by others, as with a plain open()"
    strip = np.asarray(Image.open(out).convert("L"), dtype=np.float64)
    tile = 64  # 8x8 digits upscaled 8x
    assert strip.shape == (tile + 28, 11 * (tile + 4) - 4)
    # frame t=0 is the digit itself
    digit = load_digits()[0][5, 0].numpy()
    expected = np.kron((digit + 1) * 127.5, np.ones((8, 8)))
    assert np.abs(strip[:tile, :tile] - np.round(expected)).max() <= 1
    # the last frame is (almost) pure noise: uncorrelated with the digit
    last = strip[:tile, 10 * (tile + 4):10 * (tile + 4) + tile]
    assert abs(np.corrcoef(last.ravel(), expected.ravel())[0, 1]) < 0.3
    # the printed SNR at each frame is abar / (1 - abar) of the linear schedule
    lines = capsys.readouterr().out.splitlines()
    rows = {int(l.split()[0]): l.split() for l in lines if l.split() and l.split()[0].isdigit()}
    assert sorted(rows) == list(range(0, 1001, 100))
    abar = NoiseSchedule.from_name("linear").alphas_cumprod
    for t in (100, 500, 1000):
        assert float(rows[t][2]) == pytest.approx(float(abar[t - 1] / (1 - abar[t - 1])), rel=1e-3)
    assert rows[0][2] == "inf"


def test_forward_on_a_user_image_with_another_schedule(tmp_path, capsys):
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(src)
    out = tmp_path / "strip.png"
    assert main(["forward", str(src), "-o", str(out), "--schedule", "cosine", "--every", "250", "--size", "32"]) == 0
    assert Image.open(out).size == (5 * (64 + 4) - 4, 64 + 28)
    assert "schedule cosine" in capsys.readouterr().out


def test_forward_bad_input_leaves_nothing_behind(tmp_path, capsys):
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    out = tmp_path / "strip.png"
    out.write_bytes(b"previous result")
    assert main(["forward", str(corrupt), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot read image" in err and "PNG" in err
    assert out.read_bytes() == b"previous result"
    assert main(["forward", str(tmp_path / "missing.png"), "-o", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["forward", "-o", str(tmp_path / "strip.xyz")]) == 2
    assert "format" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse lists the valid schedules
        main(["forward", "--schedule", "quadratic"])
    assert "linear" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.png", "strip.png"]


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    from diffusekit.images import save_image

    out = tmp_path / "strip.png"
    Image.new("L", (4, 4), 10).save(out)
    before = out.read_bytes()

    def exploding_save(self, fp, format=None, **params):
        with open(fp, "wb") as f:
            f.write(b"half an image")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", exploding_save)
    with pytest.raises(OSError):
        save_image(Image.new("L", (4, 4), 200), out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["strip.png"]


def test_python_dash_m_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "diffusekit", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "forward" in result.stdout


def test_strip_frames_follow_the_closed_form():
    from diffusekit.visualize import forward_frames

    sched = NoiseSchedule.from_name("linear")
    x0, noise = torch.ones(1, 2, 2), torch.randn(1, 2, 2, generator=torch.Generator().manual_seed(0))
    frames = forward_frames(x0, sched, [0, 1, 1000], noise)
    assert torch.equal(frames[0].image, x0) and math.isinf(frames[0].snr)
    a = sched.alphas_cumprod[0].item()
    assert torch.allclose(frames[1].image, math.sqrt(a) * x0 + math.sqrt(1 - a) * noise)
    with pytest.raises(ValueError, match="outside"):
        forward_frames(x0, sched, [1001], noise)


def test_benchmark_script_bad_input_is_one_line(tmp_path):
    """A benchmark script given a run folder that does not exist says so in one line, status 2."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "text_to_image.py"
    result = subprocess.run([sys.executable, str(script), "--run", str(tmp_path / "nope")], capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"text_to_image.py: error: no such run or checkpoint folder: {tmp_path / 'nope'}"]
