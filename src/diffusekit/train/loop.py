"""The training loop: AdamW with warm-up, gradient clipping and accumulation, EMA, mixed precision,
atomic checkpoints with exact resume, sample grids, a JSONL log and a loss curve, and DDP under
torchrun.

Every random draw of a step (which images, their flips, noise levels and noise) is a pure function
of (seed, step) for the *global* batch, and each rank takes its slice. That makes a resumed run
bit-identical to an uninterrupted one, and N processes equivalent to one with the same global batch.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .._utils import atomic_path
from ..data import load_dataset
from ..denoiser import Denoiser
from ..forward import WEIGHTINGS, loss as diffusion_loss, sample_training_sigmas
from ..images import image_grid, line_plot, save_image
from ..nn.text import LearnedEncoder, build_text_encoder
from ..nn.unet import PRESETS, UNet, UNetConfig, preset
from ..pipelines.generate import generate
from ..schedules import BETA_SCHEDULES, NoiseSchedule
from .checkpoint import (FORMAT, VERSION, load_state_strict, read_config, read_weights, resolve_checkpoint,
                         save_checkpoint)


# U-Nets sized for a few minutes (digits) to twenty (mnist, shapes) on a laptop CPU
DATA_PRESETS = {"digits": "digits", "mnist": "mnist", "shapes": "shapes", "shapes-heldout": "shapes"}


@dataclass
class TrainConfig:
    data: str = "digits"
    out: str | None = None  # default: runs/<data name>
    preset: str | None = None  # default: the data's own (DATA_PRESETS), else "digits"
    resolution: int | None = None  # default: the data's own
    channels: int | None = None  # image folders: 1 (grey) or 3 (RGB, default)
    schedule: str = "cosine"  # on 8x8-32x32 images it trains to better samples than linear (FD 5.5 vs 9.1 on digits)
    num_train_steps: int = 1000  # T
    prediction: str = "v"  # bounded x0 errors at high noise (eps errors grow with sigma); eps and x0 also work
    class_conditional: bool = False  # condition on the data's labels (classifier-free guidance ready)
    text_encoder: str | None = None  # condition on captions through cross-attention: minilm | learned | clip:PATH
    cond_dropout: float = 0.1  # labels/captions dropped to "unconditional" this often (for guidance)
    sample_guidance: float = 3.0  # guidance scale of the preview grids of conditional runs
    weighting: str = "min_snr"  # min-SNR-5 converges faster than L_simple (Hang et al. 2023)
    min_snr_gamma: float = 5.0
    steps: int | None = None  # budget in optimizer steps ...
    minutes: float | None = None  # ... and/or in wall-clock minutes (whichever ends first)
    batch_size: int = 64  # global batch (all ranks, all accumulation steps)
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.995  # a ~200-step horizon suits minutes-long CPU runs; raise it for long runs
    dropout: float | None = None  # default: the preset's
    precision: str = "fp32"  # fp32 | bf16 | fp16 (CUDA)
    flip: bool = False  # random horizontal flips (off for digits: a flipped 7 is not a digit)
    checkpoint_every: int = 1000  # steps between checkpoints (and loss plots) ...
    sample_every: int = 1000  # ... and sample grids
    save_minutes: float | None = None  # also checkpoint + sample when this many minutes have passed
    num_samples: int = 64
    sampler: str = "dpmpp_2m"
    sample_steps: int = 25
    log_every: int = 25
    seed: int = 0
    device: str | None = None  # default: cuda if available

    def validate(self) -> None:
        def fail(name, why):
            raise ValueError(f"--{name.replace('_', '-')}: {why}")

        if self.schedule not in BETA_SCHEDULES:
            fail("schedule", f"unknown {self.schedule!r}; valid: {', '.join(BETA_SCHEDULES)}")
        if self.prediction not in ("eps", "v", "x0"):
            fail("prediction", f"unknown {self.prediction!r}; valid: eps, v, x0")
        if self.weighting not in WEIGHTINGS:
            fail("weighting", f"unknown {self.weighting!r}; valid: {', '.join(WEIGHTINGS)}")
        if self.preset is not None and self.preset not in PRESETS:
            fail("preset", f"unknown {self.preset!r}; valid: {', '.join(PRESETS)}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            fail("precision", f"unknown {self.precision!r}; valid: fp32, bf16, fp16")
        for name in ("batch_size", "grad_accum", "checkpoint_every", "sample_every", "log_every", "num_train_steps"):
            if getattr(self, name) < 1:
                fail(name, "must be >= 1")
        if self.steps is not None and self.steps < 1:
            fail("steps", "must be >= 1")
        if self.minutes is not None and self.minutes <= 0:
            fail("minutes", "must be > 0")
        if self.save_minutes is not None and self.save_minutes <= 0:
            fail("save_minutes", "must be > 0")
        if not 0 <= self.ema_decay < 1:
            fail("ema_decay", "must lie in [0, 1)")
        if self.lr <= 0:
            fail("lr", "must be > 0")
        if self.class_conditional and self.text_encoder:
            fail("text_encoder", "a model is conditioned on classes or on text, not both")
        if not 0 <= self.cond_dropout < 1:
            fail("cond_dropout", "must lie in [0, 1)")
        if self.sample_guidance < 0:
            fail("sample_guidance", "must be >= 0")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class StopTraining(Exception):
    """Raised when the loss stops being finite; the last good checkpoint is kept."""


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


# ---------------------------------------------------------------------------------------------
# Deterministic per-step randomness
# ---------------------------------------------------------------------------------------------


def _step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


def global_batch_indices(seed: int, step: int, batch: int, n: int) -> torch.Tensor:
    """Dataset indices of the global batch at `step`: epochs are seeded permutations, walked in order."""
    positions = torch.arange(step * batch, (step + 1) * batch)
    out = torch.empty(batch, dtype=torch.long)
    for epoch in positions.div(n, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n, generator=_step_generator(seed, epoch, 0))
        mask = positions.div(n, rounding_mode="floor") == epoch
        out[mask] = perm[positions[mask] % n]
    return out


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _model_config(cfg: TrainConfig, data, text_dim: int | None) -> dict:
    overrides = {"in_channels": data.channels, "image_size": data.resolution}
    if cfg.dropout is not None:
        overrides["dropout"] = cfg.dropout
    if cfg.class_conditional:
        overrides["num_classes"] = data.num_classes
    if text_dim is not None:
        overrides.update(attention_type="transformer", context_dim=text_dim, pooled_context_dim=text_dim)
    return preset(cfg.preset or DATA_PRESETS.get(cfg.data, "digits"), **overrides).to_dict()


def text_encoder_spec(name: str | None) -> dict | None:
    """`minilm` or `clip:PATH` as the spec saved in config.json."""
    if name is None:
        return None
    if name.startswith("clip:"):
        return {"name": "clip", "path": str(Path(name[len("clip:"):]).resolve())}
    if name == "learned":  # its full shape, so a checkpoint survives changes of the defaults
        defaults = inspect.signature(LearnedEncoder).parameters
        return {"name": "learned", **{k: p.default for k, p in defaults.items()}}
    return {"name": name}


def _check_conditioning(cfg: TrainConfig, data) -> None:
    if cfg.class_conditional and not data.num_classes:
        raise ValueError(f"--class-conditional needs labelled data (digits, mnist); {data.name} has no labels")
    if cfg.text_encoder and not hasattr(data, "captions"):
        raise ValueError(f"--text-encoder needs captioned data (shapes); {data.name} has no captions")


def _checkpoint_config(cfg: TrainConfig, model_config: dict, data) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": {"type": "unet", "config": model_config},
        "schedule": {"name": cfg.schedule, "num_steps": cfg.num_train_steps, "zero_terminal_snr": False},
        "prediction": cfg.prediction,
        "data": {"name": data.name, "channels": data.channels, "resolution": data.resolution,
                 "num_classes": data.num_classes},
        "text_encoder": text_encoder_spec(cfg.text_encoder),
        "conditioning": "class" if cfg.class_conditional else ("text" if cfg.text_encoder else None),
        "ema": True,
        "train": asdict(cfg),
    }


def _prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, is_main: bool) -> None:
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


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    """Train (or resume) a run; returns the run folder."""
    run_dir = Path(cfg.out or f"runs/{Path(cfg.data).name}")
    if resume:  # the run's own settings win, except the budget and output cadence the user gives now
        saved = TrainConfig.from_dict(read_config(run_dir)["train"])
        for name in ("steps", "minutes", "checkpoint_every", "sample_every", "save_minutes", "log_every"):
            setattr(saved, name, getattr(cfg, name))
        saved.out, cfg = str(run_dir), saved
    cfg.validate()
    ddp, device = init_distributed(cfg.device)
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device (use bf16 on the CPU)")
    if cfg.batch_size % (ddp.world * cfg.grad_accum):
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by processes x grad-accum = {ddp.world * cfg.grad_accum}")

    # every setting is checked before --overwrite clears anything
    data = load_dataset(cfg.data, cfg.resolution, cfg.channels)
    _check_conditioning(cfg, data)
    text_encoder = None
    if cfg.text_encoder:
        with torch.random.fork_rng():  # a learned encoder's initial weights follow --seed; other streams are untouched
            torch.manual_seed(cfg.seed)
            text_encoder = build_text_encoder(text_encoder_spec(cfg.text_encoder)).to(device)
    _prepare_run_dir(run_dir, resume, overwrite, ddp.main)
    model_config = _model_config(cfg, data, text_encoder.dim if text_encoder is not None else None)
    ckpt_config = _checkpoint_config(cfg, model_config, data)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    net = UNet(UNetConfig.from_dict(model_config)).to(device)
    if isinstance(text_encoder, LearnedEncoder):
        # trained jointly: as a submodule it is optimised, averaged (EMA), synced (DDP) and saved
        # (text_encoder.* in model.safetensors) with the U-Net, whose forward never touches it
        net.add_module("text_encoder", text_encoder)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    schedule = NoiseSchedule.from_name(cfg.schedule, cfg.num_train_steps)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    start_step = 0
    if resume:
        folder = resolve_checkpoint(run_dir)
        saved = read_config(folder)
        if UNetConfig.from_dict(saved["model"]["config"]).to_dict() != model_config:  # older configs lack new fields
            raise ValueError(f"{folder} holds a different model than these settings; resume with the run's own settings")
        state = torch.load(folder / "train_state.pt", map_location="cpu", weights_only=True)
        load_state_strict(net, state["model"], folder / "train_state.pt")
        load_state_strict(ema, read_weights(folder / "model.safetensors"), folder / "model.safetensors")
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        start_step = int(state["step"])
    else:
        torch.manual_seed(cfg.seed + ddp.rank)  # dropout masks differ across ranks
    model = torch.nn.parallel.DistributedDataParallel(net) if ddp.world > 1 else net
    denoiser = Denoiser(model, schedule, cfg.prediction)

    log_path = run_dir / "log.jsonl"
    history = read_log(log_path, upto=start_step)
    if ddp.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _rewrite_log(log_path, history)

    total = cfg.steps if cfg.steps is not None else (None if cfg.minutes else 2000)
    deadline = time.monotonic() + cfg.minutes * 60 if cfg.minutes else None
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    local = cfg.batch_size // ddp.world
    micro = local // cfg.grad_accum

    def checkpoint(step: int) -> None:
        if ddp.main:
            train_state = {"step": step, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                           "torch_rng": torch.get_rng_state(), "scaler": scaler.state_dict() if scaler else {}}
            save_checkpoint(run_dir, step, ckpt_config, ema.state_dict(), train_state)
            _save_loss_plot(run_dir, history)
        if ddp.world > 1:
            dist.barrier()

    def samples(step: int) -> None:
        if not ddp.main:
            return
        with torch.no_grad():
            preview = preview_conditioning(cfg, data, getattr(ema, "text_encoder", text_encoder), device)
        x = generate(Denoiser(ema, schedule, cfg.prediction), schedule, (data.channels, data.resolution, data.resolution),
                     cfg.num_samples, seed=cfg.seed, sampler=cfg.sampler, steps=cfg.sample_steps, device=device,
                     clip=(-1.0, 1.0), **preview)
        grid = image_grid(x)
        save_image(grid, run_dir / "samples" / f"step-{step:08d}.png")
        save_image(grid, run_dir / "samples.png")

    bar = tqdm(total=total, initial=start_step, disable=not (progress and ddp.main), desc="train", unit="step",
               dynamic_ncols=True)
    step, window, t_window = start_step, [], time.monotonic()
    last_save = time.monotonic()
    net.train()
    try:
        while True:
            now = time.monotonic()
            stop = (total is not None and step >= total) or (deadline is not None and now >= deadline)
            save_due = cfg.save_minutes is not None and now - last_save >= cfg.save_minutes * 60 and step > start_step
            if ddp.world > 1:  # every rank must take the same decisions at the same step
                flags = torch.tensor([float(stop), float(save_due)], device=device)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                stop, save_due = bool(flags[0].item()), bool(flags[1].item())
            if stop:
                break
            if save_due and step % cfg.checkpoint_every:  # not already saved at this step
                checkpoint(step)
                samples(step)
                last_save = now

            # the global batch's data and randomness, then this rank's slice
            idx = global_batch_indices(cfg.seed, step, cfg.batch_size, len(data))
            g = _step_generator(cfg.seed, step, 1)
            sigma = sample_training_sigmas(denoiser, cfg.batch_size, generator=g)
            noise = torch.randn((cfg.batch_size, data.channels, data.resolution, data.resolution), generator=g)
            flips = torch.rand(cfg.batch_size, generator=g) < 0.5
            mine = slice(ddp.rank * local, (ddp.rank + 1) * local)
            x0, labels = data.batch(idx[mine])
            if cfg.flip:
                x0 = torch.where(flips[mine, None, None, None], x0.flip(-1), x0)
            x0, sigma, noise = x0.to(device), sigma[mine].to(device), noise[mine].to(device)
            class_labels = captions = None
            if cfg.class_conditional or text_encoder is not None:  # drawn only then: unconditional runs keep their streams
                drop = (torch.rand(cfg.batch_size, generator=g) < cfg.cond_dropout)[mine]
                if cfg.class_conditional:
                    class_labels = torch.where(drop, data.num_classes, labels).to(device)
                else:
                    captions = ["" if d else c for d, c in zip(drop.tolist(), data.captions(idx[mine]))]

            def micro_cond(part: slice) -> dict:
                # a learned encoder runs per micro-batch: each backward needs its own graph
                if class_labels is not None:
                    return {"class_labels": class_labels[part]}
                return text_encoder(captions[part]).cond(pooled=True) if captions is not None else {}

            lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
            for group in optimizer.param_groups:
                group["lr"] = lr
            total_loss = 0.0
            for k in range(cfg.grad_accum):
                part = slice(k * micro, (k + 1) * micro)
                sync = ddp.world == 1 or k == cfg.grad_accum - 1
                with (model.no_sync() if not sync else contextlib.nullcontext()), torch.autocast(
                        device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                    value = diffusion_loss(denoiser, x0[part], sigma=sigma[part], noise=noise[part],
                                           weighting=cfg.weighting, min_snr_gamma=cfg.min_snr_gamma,
                                           **micro_cond(part))
                    value = value / cfg.grad_accum
                (scaler.scale(value) if scaler else value).backward()
                total_loss += value.item()
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
            with torch.no_grad():
                for e, p in zip(ema.parameters(), net.parameters()):
                    e.lerp_(p, 1 - decay)
            step += 1

            window.append(total_loss)
            if step % cfg.log_every == 0 or step == total:
                elapsed = time.monotonic() - t_window
                record = {"step": step, "loss": sum(window) / len(window), "lr": lr, "grad_norm": float(grad_norm),
                          "steps_per_s": len(window) / max(elapsed, 1e-9), "time": time.time()}
                history.append(record)
                if ddp.main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                window, t_window = [], time.monotonic()
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
    if step > start_step or not (run_dir / "latest").exists():
        if step % cfg.checkpoint_every:
            checkpoint(step)
        if step % cfg.sample_every:
            samples(step)
    if ddp.world > 1:
        dist.barrier()
    return run_dir


def preview_conditioning(cfg: TrainConfig, data, text_encoder, device) -> dict:
    """generate() keywords for the preview grids: every class in turn, or the data's first captions,
    with guidance."""
    n = cfg.num_samples
    if cfg.class_conditional:
        labels = torch.arange(n) % data.num_classes
        return {"cond": {"class_labels": labels.to(device)},
                "uncond": {"class_labels": torch.full((1,), data.num_classes, device=device)},
                "guidance": cfg.sample_guidance}
    if text_encoder is not None:
        captions = data.captions(torch.arange(n))
        return {"cond": text_encoder(captions).cond(pooled=True), "uncond": text_encoder([""]).cond(pooled=True),
                "guidance": cfg.sample_guidance}
    return {}


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
