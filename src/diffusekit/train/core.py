"""The training core every diffusekit model shares: AdamW with warm-up, gradient clipping and
accumulation, EMA, mixed precision, atomic checkpoints with exact resume, preview grids, a JSONL log
and a loss curve, a progress bar, and DDP under torchrun.

What differs between models is a `Job`: the network, its checkpoint config, the per-step batch, the
loss of a micro-batch, an optional second update after the optimizer step (a GAN discriminator's),
the preview images, and any extra state to save. The diffusion trainer (`loop.py`) and the
autoencoder trainer (`autoencoder.py`) are two jobs run by `fit`.

Every random draw of a step must be a pure function of (seed, step) for the *global* batch, each
rank taking its slice (`Job.batch` gets both). That makes a resumed run bit-identical to an
uninterrupted one, and N processes equivalent to one with the same global batch.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._utils import atomic_path
from ..images import image_grid, line_plot, save_image
from .checkpoint import load_state_strict, read_config, read_weights, resolve_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

# settings a resumed run takes from the command line (how it is driven, not what it trains);
# everything else comes from the run itself
RESUME_OVERRIDES = ("steps", "minutes", "checkpoint_every", "sample_every", "save_minutes", "log_every", "compile")


LR_SCHEDULES = ("constant", "cosine")
ADAM_BETA2 = 0.999  # AdamW's (and PyTorch's) default second-moment decay


def learning_rate(cfg, step: int, spent: float) -> float:
    """The learning rate at `step`: linear warm-up, then constant or a cosine decay to 0 over the
    budget. `spent` in [0, 1] is how much of the budget is spent (steps or wall-clock, whichever
    is further): decaying with the budget itself is what lets a minutes-long run end on small steps."""
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.lr_schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, spent)))
    return lr


class StopTraining(Exception):
    """Raised when the loss stops being finite; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------
# Settings shared by every trainer (duck-typed: each trainer's config dataclass has these fields)
# ---------------------------------------------------------------------------------------------


def validate_loop_settings(cfg) -> None:
    """Checks of the fields every trainer config has; errors name the command-line option."""
    def fail(name, why):
        raise ValueError(f"--{name.replace('_', '-')}: {why}")

    if cfg.precision not in ("fp32", "bf16", "fp16"):
        fail("precision", f"unknown {cfg.precision!r}; valid: fp32, bf16, fp16")
    for name in ("batch_size", "grad_accum", "checkpoint_every", "sample_every", "log_every"):
        if getattr(cfg, name) < 1:
            fail(name, "must be >= 1")
    if cfg.steps is not None and cfg.steps < 1:
        fail("steps", "must be >= 1")
    if cfg.minutes is not None and cfg.minutes <= 0:
        fail("minutes", "must be > 0")
    if cfg.save_minutes is not None and cfg.save_minutes <= 0:
        fail("save_minutes", "must be > 0")
    if not 0 <= cfg.ema_decay < 1:
        fail("ema_decay", "must lie in [0, 1)")
    if cfg.lr <= 0:
        fail("lr", "must be > 0")
    if cfg.adam_beta2 is not None and not 0 < cfg.adam_beta2 < 1:
        fail("adam_beta2", "must lie in (0, 1)")
    if cfg.lr_schedule not in LR_SCHEDULES:
        fail("lr_schedule", f"unknown {cfg.lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}")


def check_crop_settings(cfg) -> None:
    """--crop / --whole-after, for the trainers that have them."""
    if cfg.crop is not None and cfg.crop < 1:
        raise ValueError(f"--crop: must be >= 1, got {cfg.crop}")
    if cfg.whole_after is not None:
        if cfg.crop is None:
            raise ValueError("--whole-after: only with --crop (it ends crop training on whole images)")
        if not 0 <= cfg.whole_after < 1:
            raise ValueError(f"--whole-after: a fraction of the budget in [0, 1), got {cfg.whole_after}")


def check_crop_fits(crop: int | None, resolution: int, multiple: int, why: str) -> None:
    """--crop must tile the network's downsampling (`multiple`, because of `why`) and fit the images."""
    if crop is not None and (crop % multiple or crop > resolution):
        raise ValueError(f"--crop {crop}: must be a multiple of {multiple} ({why}) and at most the "
                         f"{resolution}px image side")


def random_crops(images: Tensor, side: int, generator: torch.Generator, batch_size: int, rows: slice,
                 grid: int = 1) -> Tensor:
    """side x side windows of this rank's `images` (rows `rows` of the global batch) at offsets that
    are multiples of `grid`, drawn for the whole global batch so that any rank layout gets the same."""
    cells = (images.shape[-1] - side) // grid + 1
    offsets = (torch.randint(cells, (batch_size, 2), generator=generator)[rows] * grid).tolist()
    return torch.stack([img[:, r:r + side, c:c + side] for img, (r, c) in zip(images, offsets)])


def cropping(cfg, spent: float) -> bool:
    """Whether this step trains on crops: --crop, until --whole-after of the budget is spent. Whole
    images at the end matter because GroupNorm and attention see statistics over the whole image: a
    network trained only on crops of mostly-background images drew a grey haze on whole ones."""
    return cfg.crop is not None and (cfg.whole_after is None or spent < cfg.whole_after)


def config_from_dict(cls, d: dict):
    """A trainer config from a saved `train` dict; fields added since are left at their defaults."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known})


def resumed_settings(cls, cfg, run_dir: Path, given=None, legacy=None):
    """The run's own settings, except the budget and output cadence the user gives now. `given`:
    the names of the settings the user gave (the CLI's flags); None: those not at their default.
    `legacy(config)`: from the run's config.json, values for settings a run saved before they
    existed trained with."""
    config = read_config(run_dir)
    # runs saved before --lr-schedule, --snr-floor and --adam-beta2 existed trained at a constant rate,
    # without a floor, with AdamW's default beta2
    saved = config_from_dict(cls, {"lr_schedule": "constant", "snr_floor": 0.0, "adam_beta2": ADAM_BETA2,
                                   **(legacy(config) if legacy else {}), **config["train"]})
    # a setting given now that the run did not train with is not applied: say so
    ignored = [f.name for f in fields(cls) if f.name not in (*RESUME_OVERRIDES, "out")
               and (f.name in given if given is not None else getattr(cfg, f.name) != f.default)
               and getattr(cfg, f.name) != getattr(saved, f.name)]
    if int(os.environ.get("RANK", 0)) != 0:  # said once under torchrun, by rank 0, not once per process
        ignored = []
    for name in ignored:
        flag = "--" + name.replace("_", "-")
        log.warning("--resume continues %s with its own %s %s, not the %s given now; start a new run to change it",
                    run_dir, flag, getattr(saved, name), getattr(cfg, name))
    for name in RESUME_OVERRIDES:
        setattr(saved, name, getattr(cfg, name))
    saved.out = str(run_dir)
    return saved


# ---------------------------------------------------------------------------------------------
# Distributed helpers (torchrun sets WORLD_SIZE / RANK / LOCAL_RANK)
# ---------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        if cuda:
            torch.cuda.set_device(d.local_rank)
            return d, torch.device("cuda", d.local_rank)
        return d, torch.device("cpu")
    return Dist(), torch.device(device or ("cuda" if cuda else "cpu"))


def check_devices(cfg, ddp: Dist, device: torch.device) -> None:
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device (use bf16 on the CPU)")
    if cfg.batch_size % (ddp.world * cfg.grad_accum):
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by processes x grad-accum = "
                         f"{ddp.world * cfg.grad_accum}")


# ---------------------------------------------------------------------------------------------
# Deterministic per-step randomness
# ---------------------------------------------------------------------------------------------


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """The generator of one random stream of one step (stream 0 is the epochs' permutations)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


def global_batch_indices(seed: int, step: int, batch: int, n: int) -> torch.Tensor:
    """Dataset indices of the global batch at `step`: epochs are seeded permutations, walked in order."""
    positions = torch.arange(step * batch, (step + 1) * batch)
    out = torch.empty(batch, dtype=torch.long)
    for epoch in positions.div(n, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n, generator=step_generator(seed, epoch, 0))
        mask = positions.div(n, rounding_mode="floor") == epoch
        out[mask] = perm[positions[mask] % n]
    return out


# ---------------------------------------------------------------------------------------------
# The pluggable part
# ---------------------------------------------------------------------------------------------


class Job:
    """What `fit` trains. Subclasses set `net` (optimised by the core; its EMA copy is what
    model.safetensors holds) and `config` (config.json of every checkpoint), and implement `batch`
    and `loss`; the other hooks have do-nothing defaults."""

    net: nn.Module
    config: dict
    preview_columns: int | None = None  # columns of the preview grid (default: square)
    spent: float = 0.0  # the fraction of the budget spent, set by `fit` before each `batch`

    def check_resumable(self, saved: dict, folder: Path) -> None:
        """Raise a ValueError when the checkpoint `folder` (config `saved`) holds another model."""
        if saved.get("model") != self.config.get("model"):
            raise ValueError(f"{folder} holds a different model than these settings; resume with the run's own settings")

    def attach(self, model: nn.Module, ema: nn.Module) -> None:
        """Called once before the first step with the (possibly DDP-wrapped) model and the EMA copy."""

    def batch(self, step: int, rows: slice):
        """The data and randomness of the global batch at `step` (a function of (seed, step) only),
        restricted to this rank's `rows`."""
        raise NotImplementedError

    def loss(self, batch, part: slice) -> tuple[Tensor, dict[str, float]]:
        """The loss of micro-batch `part` of `batch` (runs under autocast) and numbers to log."""
        raise NotImplementedError

    def after_step(self, step: int, batch, lr: float) -> dict[str, float]:
        """A second update after the optimizer step (e.g. a discriminator's); numbers to log."""
        return {}

    def preview(self, ema: nn.Module) -> Tensor | None:
        """Images [N, C, H, W] in [-1, 1] for the preview grid, or None."""
        return None

    def state_dict(self) -> dict:
        """Extra state for train_state.pt (tensors and plain containers: it is read with weights_only)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def extra_weights(self) -> dict[str, dict[str, Tensor]]:
        """Further safetensors files written into every checkpoint folder: {file name: state dict}."""
        return {}


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def check_compile_supported(device: torch.device | str) -> None:
    """torch.compile builds CPU kernels with a C++ compiler: without one it would fail only at the
    first step, with a long inductor traceback."""
    if torch.device(device).type == "cpu" and not any(
            shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")):
        raise ValueError("--compile on the CPU needs a C++ compiler (torch.compile builds its kernels with one): "
                         "install g++, or leave out --compile")


def compile_for_training(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """torch.compile (inductor) for the training step. On the CPU with inductor's C++ wrapper: the
    compiled forward and backward then launch their kernels from C++ instead of a generated
    Python function, which is most of what compiling buys a small model whose step is hundreds
    of short ops (digits-sized U-Net: compiled 1.07-1.10x eager with the C++ wrapper on one and
    two threads, 1.02x without it; compiling takes 2.5-3 minutes instead of ~1.5, once, cached on
    disk)."""
    options = {"cpp_wrapper": True} if torch.device(device).type == "cpu" else None
    return torch.compile(model, options=options)


def adamw(params, **options) -> torch.optim.AdamW:
    """AdamW, with PyTorch's fused kernel where every parameter's device has one (CPU, CUDA): one
    kernel per step instead of a loop over the tensors, 4-5x faster on the CPU for 1M-36M-parameter
    U-Nets (`benchmarks/unet_speed.py`)."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, fused=True if fused else None, **options)


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, is_main: bool) -> None:
    has_run = (run_dir / "latest").exists() or (run_dir / "checkpoints").exists() or (run_dir / "log.jsonl").exists()
    if resume:
        if not has_run:
            raise ValueError(f"--resume: {run_dir} holds no run to resume")
        return
    if has_run and not overwrite:
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to replace it")
    if has_run and is_main:
        for name in ("checkpoints", "samples"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in ("latest", "log.jsonl", "loss.png", "samples.png"):
            (run_dir / name).unlink(missing_ok=True)


def fit(cfg, job: Job, run_dir: Path, ddp: Dist, device: torch.device, *, resume: bool = False,
        overwrite: bool = False, progress: bool = True, desc: str = "train", started: float | None = None) -> Path:
    """Train `job.net` under the loop settings of `cfg` (or resume it from run_dir); returns run_dir.
    The job is built first: every setting is checked before --overwrite clears anything.
    `started`: the time.monotonic() at which the command began; a --minutes budget counts from it,
    so building the job (loading data, encoding captions or latents) is spent from the budget too
    and `--minutes 20` ends about 20 minutes after it was typed."""
    if cfg.minutes and started is not None and time.monotonic() - started >= cfg.minutes * 60:
        raise ValueError(f"the setup (loading and encoding the data) took {(time.monotonic() - started) / 60:.1f} "
                         f"minutes, all of --minutes {cfg.minutes:g}: nothing was trained; give more --minutes")
    if cfg.compile:
        check_compile_supported(device)
    prepare_run_dir(run_dir, resume, overwrite, ddp.main)
    net = job.net
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = adamw(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps,
                      betas=(0.9, cfg.adam_beta2))
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    start_step, start_seconds = 0, 0.0
    if resume:
        folder = resolve_checkpoint(run_dir)
        job.check_resumable(read_config(folder), folder)
        state = torch.load(folder / "train_state.pt", map_location="cpu", weights_only=True)
        load_state_strict(net, state["model"], folder / "train_state.pt")
        load_state_strict(ema, read_weights(folder / "model.safetensors"), folder / "model.safetensors")
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        job.load_state_dict(state.get("job", {}))
        torch.set_rng_state(state["torch_rng"])
        start_step = int(state["step"])
        start_seconds = float(state.get("train_seconds", 0.0))
    else:
        torch.manual_seed(cfg.seed + ddp.rank)  # dropout masks differ across ranks
    model = torch.nn.parallel.DistributedDataParallel(net) if ddp.world > 1 else net
    if cfg.compile:
        # the training forward and backward only; net (checkpoints, EMA) stays the plain module.
        # Compiled once on the first step (minutes on a CPU, cached on disk for the next
        # runs), then each step is the same function with fewer, fused kernels.
        model = compile_for_training(model, device)
    job.attach(model, ema)

    log_path = run_dir / "log.jsonl"
    history = read_log(log_path, upto=start_step)
    if ddp.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _rewrite_log(log_path, history)

    total = cfg.steps if cfg.steps is not None else (None if cfg.minutes else 2000)
    loop_started = time.monotonic()
    deadline = (loop_started if started is None else started) + cfg.minutes * 60 if cfg.minutes else None

    def budget_spent(step: int, now: float) -> float:
        """The spent fraction of the whole budget: steps done / --steps, or training time so far /
        (the time before this session + the time until the deadline), whichever is further. The
        decay spans the training loop (not the setup before it); a resumed run continues its
        decay, stretched over the budget it now has, instead of restarting it."""
        p = step / total if total else 0.0
        if deadline is not None:
            p = max(p, (start_seconds + now - loop_started) / max(start_seconds + deadline - loop_started, 1e-9))
        return min(1.0, p)

    spent = budget_spent(start_step, loop_started)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    local = cfg.batch_size // ddp.world
    micro = local // cfg.grad_accum

    def checkpoint(step: int) -> None:
        if ddp.main:
            train_state = {"step": step, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                           "torch_rng": torch.get_rng_state(), "scaler": scaler.state_dict() if scaler else {},
                           "job": job.state_dict(),
                           "train_seconds": start_seconds + time.monotonic() - loop_started}
            save_checkpoint(run_dir, step, job.config, ema.state_dict(), train_state, extra=job.extra_weights())
            _save_loss_plot(run_dir, history)
        if ddp.world > 1:
            dist.barrier()

    def samples(step: int) -> None:
        if not ddp.main:
            return
        with torch.no_grad():
            x = job.preview(ema)
        if x is None:
            return
        grid = image_grid(x, columns=job.preview_columns)
        save_image(grid, run_dir / "samples" / f"step-{step:08d}.png")
        save_image(grid, run_dir / "samples.png")

    def autocast():
        return torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)

    job.autocast = autocast
    ema_params, net_params = list(ema.parameters()), list(net.parameters())
    bar = tqdm(total=total, initial=start_step, disable=not (progress and ddp.main), desc=desc, unit="step",
               dynamic_ncols=True)
    step, window, t_window = start_step, [], time.monotonic()
    last_save = time.monotonic()
    net.train()

    def log_window(step: int) -> None:
        """Append the mean of the steps since the last record to log.jsonl (and the history)."""
        nonlocal window, t_window
        elapsed = time.monotonic() - t_window
        record = {"step": step, "loss": sum(w["loss"] for w in window) / len(window), "lr": window[-1]["lr"],
                  "grad_norm": window[-1]["grad_norm"], "steps_per_s": len(window) / max(elapsed, 1e-9),
                  "time": time.time()}
        for name in window[-1]:
            if name not in record:  # numbers a job logs only on some steps average over those steps
                values = [w[name] for w in window if name in w]
                record[name] = sum(values) / len(values)
        history.append(record)
        if ddp.main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        window, t_window = [], time.monotonic()

    try:
        while True:
            now = time.monotonic()
            stop = (total is not None and step >= total) or (deadline is not None and now >= deadline)
            save_due = cfg.save_minutes is not None and now - last_save >= cfg.save_minutes * 60 and step > start_step
            spent = budget_spent(step, now)
            if ddp.world > 1:  # every rank must take the same decisions (and learning rate) at the same step
                flags = torch.tensor([float(stop), float(save_due), spent], device=device, dtype=torch.float64)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                stop, save_due, spent = bool(flags[0].item()), bool(flags[1].item()), flags[2].item()
            if stop:
                break
            if save_due and step % cfg.checkpoint_every:  # not already saved at this step
                checkpoint(step)
                samples(step)
                last_save = now

            job.spent = spent
            batch = job.batch(step, slice(ddp.rank * local, (ddp.rank + 1) * local))
            lr = learning_rate(cfg, step, spent)
            for group in optimizer.param_groups:
                group["lr"] = lr
            total_loss, metrics = 0.0, {}
            for k in range(cfg.grad_accum):
                part = slice(k * micro, (k + 1) * micro)
                sync = ddp.world == 1 or k == cfg.grad_accum - 1
                with (model.no_sync() if not sync else contextlib.nullcontext()), autocast():
                    value, numbers = job.loss(batch, part)
                    value = value / cfg.grad_accum
                (scaler.scale(value) if scaler else value).backward()
                total_loss += value.item()
                for name, v in numbers.items():
                    metrics[name] = metrics.get(name, 0.0) + v / cfg.grad_accum
            if ddp.world > 1:
                reduced = torch.tensor(total_loss, device=device)
                dist.all_reduce(reduced)
                total_loss = reduced.item() / ddp.world
            if not math.isfinite(total_loss):
                raise StopTraining(step)
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():  # one kernel launch per tensor list, not per tensor
                torch._foreach_lerp_(ema_params, net_params, 1 - decay)
            metrics.update(job.after_step(step, batch, lr))
            step += 1

            window.append({"loss": total_loss, "lr": lr, "grad_norm": float(grad_norm), **metrics})
            if step % cfg.log_every == 0 or step == total:
                log_window(step)
            bar.update(1)
            postfix = {"loss": f"{total_loss:.4f}", "lr": f"{lr:.1e}"}
            if deadline is not None:  # a minutes budget: tqdm cannot know the ETA, so show the time left
                postfix["left"] = time.strftime("%M:%S", time.gmtime(max(0.0, deadline - time.monotonic())))
            bar.set_postfix(postfix)
            if step % cfg.checkpoint_every == 0:
                checkpoint(step)
                last_save = time.monotonic()
            if step % cfg.sample_every == 0:
                samples(step)
    except StopTraining:
        bar.close()
        latest = run_dir / "latest"
        kept = latest.read_text().strip() if latest.exists() else "none (no checkpoint was written yet)"
        raise ValueError(f"the loss became non-finite at step {step + 1}; training stopped. The last good checkpoint "
                         f"is {kept} in {run_dir}; try a lower --lr or --precision fp32") from None
    bar.close()
    if window:  # a minutes budget ended between two records: the last steps are logged too
        log_window(step)
    if step > start_step or not (run_dir / "latest").exists():
        if step % cfg.checkpoint_every:
            checkpoint(step)
        if step % cfg.sample_every:
            samples(step)
    if ddp.world > 1:
        dist.barrier()
    return run_dir


def read_log(path: Path, upto: float = math.inf) -> list[dict]:
    """The records of a run's log.jsonl up to step `upto`; a line cut by a crash is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if record.get("step", 0) <= upto:
            records.append(record)
    return records


def _rewrite_log(path: Path, records: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))


def _save_loss_plot(run_dir: Path, history: list[dict]) -> None:
    if history:
        plot = line_plot([r["step"] for r in history], [r["loss"] for r in history], title="training loss (log scale)")
        save_image(plot, run_dir / "loss.png")
