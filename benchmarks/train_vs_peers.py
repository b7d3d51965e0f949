"""Train-and-sample on the digits against peers: the same data, wall-clock budget, thread count,
seed, number of samples and model evaluations (NFE) for every library.

    python benchmarks/train_vs_peers.py [--minutes 5] [--n 500] [--threads 2] [--out results.csv]
                                        [--libs diffusekit,ddpm,diffusers] [--grids DIR]

Contenders (each trains in a fresh subprocess of this script, one after the other):

  diffusekit  exactly `diffusekit train --minutes M`: `train(TrainConfig(minutes=M, out=<tmp>))` with
              every other setting at its default (the ~1M "digits" U-Net, cosine schedule, v target,
              min-SNR-5, AdamW 2e-3, batch 64, EMA 0.995; it also writes its usual checkpoints and
              preview grids inside the budget), then `generate(..., sampler="dpmpp_2m", steps=20,
              clip=(-1, 1))` on the checkpoint rebuilt by `diffusekit.train.load`.
  ddpm        denoising-diffusion-pytorch (lucidrains): its `Unet(dim, dim_mults=(1, 2))` (two levels
              at 8x8; `dim` is picked so the parameter count is closest to diffusekit's) inside its
              `GaussianDiffusion` with the defaults (1000 steps, sigmoid schedule, v target), trained
              by a plain loop that does what its `Trainer` does: Adam at the README's lr 8e-5,
              betas (0.9, 0.99), gradient clipping at 1, ema-pytorch EMA (0.995, every 10 steps).
              Sampled by its own DDIM (`sampling_timesteps=20`, eta 0, x0 clipped to [-1, 1]).
  diffusers   `UNet2DModel` with diffusekit's digits architecture (block_out_channels (32, 64),
              layers_per_block 2, attention at the lower level, head dim 32: the same 1,001,729
              parameters) and `DDPMScheduler()` (1000 linear betas, eps target), trained by a plain
              loop following diffusers' examples/unconditional_image_generation/train_unconditional.py:
              AdamW lr 1e-4, betas (0.95, 0.999), weight decay 1e-6, 500 warm-up steps (then constant:
              the cosine decay needs a step count a time budget does not give), clipping at 1,
              EMAModel (warm-up, power 3/4, max 0.9999). Sampled with DPMSolverMultistepScheduler
              (DPM-Solver++ 2M, the algorithm of diffusekit's dpmpp_2m) at 20 steps with
              thresholding at sample_max_value 1 (= clipping x0 to [-1, 1]); `--diffusers-sampler ddim`
              uses DDIMScheduler (20 steps, its default leading spacing and clip_sample) instead.

All train with batch 64 on the sklearn digits (8x8 grey, [-1, 1]) until the budget runs out, then
draw `--n` samples in batches of `--sample-batch` with NFE counted by a hook on the network. The
samples are scored by `diffusekit.metrics.digit_metrics(samples, "digits")`. Ratios are
diffusekit / peer: FD (lower is better; goal <= 0.7) and sampling images/s (goal >= 1).

Peers are benchmark-only dependencies; a missing one is skipped with a message. See DESIGN.md,
"Environment facts": denoising-diffusion-pytorch installs with `--no-deps` (plus einops,
ema-pytorch, accelerate) and imports torchvision only for its image I/O, so its worker puts a stub
`torchvision` into `sys.modules` before importing it.

The machine is shared: only ratios measured in the same run mean anything. OMP_WAIT_POLICY=PASSIVE
is set for every contender (diffusekit sets it on import; here it is set before torch loads, so the
peers get it too).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: the same for every library

import argparse
import csv
import importlib.metadata
import json
import math
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

LIBS = ("diffusekit", "ddpm", "diffusers")
PEERS = {"ddpm": "denoising-diffusion-pytorch", "diffusers": "diffusers"}
BATCH = 64  # diffusekit's default global batch; the peers use the same
IMAGE = (1, 8, 8)
METRICS = ("fd_digits", "confidence", "junk_rate", "class_kl", "precision", "recall")


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ---------------------------------------------------------------------------------------------
# Shared helpers (run inside the workers)
# ---------------------------------------------------------------------------------------------


def digits_images():
    from diffusekit.data import load_dataset

    return load_dataset("digits").images.float()  # [1797, 1, 8, 8] in [-1, 1]


def batches(images, seed: int):
    """Endless batches of BATCH images: seeded shuffles, epoch after epoch."""
    import torch

    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(images), generator=g)
        for i in range(0, len(perm) - BATCH + 1, BATCH):
            yield images[perm[i:i + BATCH]]


def count_calls(module) -> list[int]:
    """A counter of forward calls of `module` (the NFE of a sampler)."""
    counter = [0]

    def hook(*_):
        counter[0] += 1

    module.register_forward_pre_hook(hook)
    return counter


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def timed_loop(minutes: float, step_fn) -> tuple[int, float]:
    """Call step_fn until `minutes` have passed (checked before each step, as diffusekit's loop does)."""
    deadline = time.monotonic() + minutes * 60
    start, steps = time.monotonic(), 0
    while time.monotonic() < deadline:
        step_fn()
        steps += 1
    return steps, time.monotonic() - start


def sample_in_batches(n: int, batch: int, draw, calls: list[int]):
    """draw(count, start) -> [count, ...] images; returns (samples, seconds, NFE per batch)."""
    import torch

    calls[0] = 0
    out, n_batches = [], 0
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        out.append(draw(min(batch, n - start), start).detach().float().cpu())
        n_batches += 1
    seconds = time.perf_counter() - t0
    return torch.cat(out), seconds, calls[0] / n_batches


def install_torchvision_stub() -> None:
    """denoising_diffusion_pytorch imports torchvision (transforms, utils) at module level for its
    Dataset and Trainer only. The PyPI torchvision here is a CUDA build that cannot load beside the
    CPU torch, so an empty stand-in is enough for the Unet and GaussianDiffusion used here."""
    tv = types.ModuleType("torchvision", "empty stand-in from benchmarks/train_vs_peers.py")
    tv.__path__ = []  # a package, so `import torchvision.x` resolves to the stubs below
    tv.__version__ = "0.0-stub"
    for sub in ("transforms", "utils"):  # `from torchvision import transforms as T, utils`
        mod = types.ModuleType(f"torchvision.{sub}", "empty stand-in: any use fails with AttributeError")
        setattr(tv, sub, mod)
        sys.modules[f"torchvision.{sub}"] = mod
    sys.modules["torchvision"] = tv


# ---------------------------------------------------------------------------------------------
# The three contenders: each returns (train record, draw function, network, recipe string)
# ---------------------------------------------------------------------------------------------


def run_diffusekit(args, device):
    from diffusekit.pipelines import generate
    from diffusekit.train import TrainConfig, load, train

    with tempfile.TemporaryDirectory(prefix="train_vs_peers_") as tmp:
        given = dict(minutes=args.minutes, out=str(Path(tmp) / "run"), seed=args.seed)
        if args.device:
            given["device"] = args.device
        cfg = TrainConfig(**given)
        t0 = time.monotonic()
        run = train(cfg, progress=False)
        wall = time.monotonic() - t0
        model = load(run, device=device)
        steps = int(model.config["step"])
    calls = count_calls(model.network)

    def sample_all(n, batch):  # one generate() call: it batches itself, sample i depends on (seed, i) only
        calls[0] = 0
        t0 = time.perf_counter()
        x = generate(model.denoiser, model.schedule, model.image_shape, n, seed=args.seed, sampler="dpmpp_2m",
                     steps=args.nfe, clip=(-1.0, 1.0), batch_size=batch, device=device)
        seconds = time.perf_counter() - t0
        return x.float().cpu(), seconds, calls[0] / math.ceil(n / batch)

    train_cfg = model.config["train"]
    recipe = (f"TrainConfig defaults: preset digits, {train_cfg['schedule']} schedule, {train_cfg['prediction']} target, "
              f"{train_cfg['weighting']} weighting, AdamW lr {train_cfg['lr']:g} warm-up {train_cfg['warmup_steps']}, "
              f"batch {train_cfg['batch_size']}, EMA {train_cfg['ema_decay']}; sampler dpmpp_2m {args.nfe} steps "
              f"(karras sigmas), x0 clipped")
    # the loop stops at the first step after the deadline, so steps / budget is its rate
    return dict(steps=steps, train_s=args.minutes * 60, train_wall_s=wall), sample_all, model.network, recipe


def run_ddpm(args, device):
    import torch

    install_torchvision_stub()
    try:
        from denoising_diffusion_pytorch.denoising_diffusion_pytorch import GaussianDiffusion, Unet
        from ema_pytorch import EMA
    except ImportError as e:
        raise PeerMissing(f"denoising-diffusion-pytorch cannot be imported ({e}); install it with "
                          f"`pip install --no-deps denoising-diffusion-pytorch` and `pip install einops ema-pytorch accelerate` "
                          f"(check with --dry-run that torch is not replaced)") from e
    from diffusekit.nn.unet import UNet, preset

    target = n_params(UNet(preset("digits", in_channels=1, image_size=8)))
    dim = args.ddpm_dim
    if dim is None:  # the even width (its sinusoidal embedding needs one) closest to diffusekit's count
        counts = {d: n_params(Unet(dim=d, dim_mults=(1, 2), channels=1)) for d in range(16, 81, 2)}
        dim = min(counts, key=lambda d: abs(counts[d] - target))
    torch.manual_seed(args.seed)
    unet = Unet(dim=dim, dim_mults=(1, 2), channels=1)
    diffusion = GaussianDiffusion(unet, image_size=8, timesteps=1000, sampling_timesteps=args.nfe,
                                  auto_normalize=False).to(device)  # the data is already in [-1, 1]
    lr = args.ddpm_lr
    opt = torch.optim.Adam(diffusion.parameters(), lr=lr, betas=(0.9, 0.99))  # as its Trainer
    ema = EMA(diffusion, beta=0.995, update_every=10).to(device)  # its Trainer's settings
    data = batches(digits_images(), args.seed)
    diffusion.train()

    def step():
        loss = diffusion(next(data).to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        ema.update()

    steps, seconds = timed_loop(args.minutes, step)
    sampler = ema.ema_model.eval()
    calls = count_calls(sampler.model)
    torch.manual_seed(args.seed)  # its sampler draws from the global generator

    def sample_all(n, batch):
        return sample_in_batches(n, batch, lambda count, start: sampler.sample(batch_size=count), calls)

    recipe = (f"Unet(dim={dim}, dim_mults=(1, 2)), GaussianDiffusion defaults (sigmoid schedule, "
              f"{diffusion.objective}), Adam lr {lr:g} betas (0.9, 0.99), clip 1, batch {BATCH}, "
              f"ema-pytorch EMA 0.995 every 10; its DDIM, {args.nfe} steps, x0 clipped")
    return dict(steps=steps, train_s=seconds, train_wall_s=seconds), sample_all, unet, recipe


def run_diffusers(args, device):
    import torch
    import torch.nn.functional as F

    try:
        from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel
    except ImportError as e:
        raise PeerMissing(f"diffusers cannot be imported ({e}); install it with `pip install diffusers`") from e

    torch.manual_seed(args.seed)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=2,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32).to(device)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)  # train_unconditional.py: linear betas, epsilon
    lr = args.diffusers_lr
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_sched = get_scheduler("constant_with_warmup", optimizer=opt, num_warmup_steps=500)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    data = batches(digits_images(), args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    model.train()

    def step():
        x0 = next(data).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),), generator=g).to(device)
        pred = model(noise_scheduler.add_noise(x0, noise, t), t).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        opt.zero_grad()
        ema.step(model.parameters())

    steps, seconds = timed_loop(args.minutes, step)
    ema.copy_to(model.parameters())
    model.eval()
    calls = count_calls(model)
    if args.diffusers_sampler == "ddim":
        make = lambda: DDIMScheduler.from_config(noise_scheduler.config)  # noqa: E731 (clip_sample, leading)
        sampler_name = f"DDIMScheduler {args.nfe} steps (leading spacing, clip_sample)"
    else:
        make = lambda: DPMSolverMultistepScheduler.from_config(  # noqa: E731
            noise_scheduler.config, thresholding=True, sample_max_value=1.0)
        sampler_name = f"DPMSolverMultistepScheduler (dpmsolver++ 2M) {args.nfe} steps, x0 clipped"

    @torch.no_grad()
    def draw(count, start):
        sched = make()  # a fresh one per batch: the scheduler keeps state between steps
        sched.set_timesteps(args.nfe)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + start)
        x = (torch.randn((count, *IMAGE), generator=gen) * sched.init_noise_sigma).to(device)
        for t in sched.timesteps:
            eps = model(sched.scale_model_input(x, t), t).sample
            x = sched.step(eps, t, x).prev_sample
        return x

    def sample_all(n, batch):
        return sample_in_batches(n, batch, draw, calls)

    recipe = (f"UNet2DModel (32, 64) x2, attention at 4x4; DDPMScheduler linear, epsilon; AdamW lr {lr:g} "
              f"betas (0.95, 0.999) wd 1e-6, warm-up 500 then constant, clip 1, batch {BATCH}, EMAModel power 3/4; "
              f"{sampler_name}")
    return dict(steps=steps, train_s=seconds, train_wall_s=seconds), sample_all, model, recipe


class PeerMissing(Exception):
    pass


RUNNERS = {"diffusekit": run_diffusekit, "ddpm": run_ddpm, "diffusers": run_diffusers}


def worker(args) -> dict:
    import diffusekit  # noqa: F401  (before torch: its thread-contention setting, already set above)
    import torch

    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        train_rec, sample_all, network, recipe = RUNNERS[args.worker](args, device)
    except PeerMissing as e:
        return {"library": args.worker, "skipped": str(e)}
    samples, seconds, nfe = sample_all(args.n, args.sample_batch)
    rec = {"library": args.worker, "params": n_params(network), **train_rec, "nfe": nfe, "n": len(samples),
           "sample_s": seconds, "images_per_s": len(samples) / seconds, "recipe": recipe,
           "device": device, "threads": torch.get_num_threads()}
    rec["steps_per_s"] = rec["steps"] / rec["train_s"]
    if not torch.isfinite(samples).all():
        rec["error"] = "samples contain NaN or inf"
        return rec
    from diffusekit.metrics import digit_metrics

    scores = digit_metrics(samples.clamp(-1, 1), "digits")
    rec.update({k: scores[k] for k in METRICS})
    if args.grids:
        from diffusekit.images import image_grid, save_image

        save_image(image_grid(samples[:64].clamp(-1, 1)), Path(args.grids) / f"{args.worker}.png")
    return rec


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def run_worker_process(lib: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="train_vs_peers_") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", lib, "--result", str(result)]
        for name in ("minutes", "n", "threads", "seed", "nfe", "sample_batch", "ddpm_lr", "diffusers_lr",
                     "diffusers_sampler", "ddpm_dim", "device", "grids"):
            value = getattr(args, name)
            if value is not None:
                cmd += [f"--{name.replace('_', '-')}", str(value)]
        timeout = args.minutes * 60 + 1200  # the budget plus imports, sampling and scoring
        try:
            # TQDM_DISABLE: denoising-diffusion-pytorch's sampler draws a progress bar per batch
            proc = subprocess.run(cmd, timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1"})
        except subprocess.TimeoutExpired:
            return {"library": lib, "error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not result.exists():
            return {"library": lib, "error": f"worker exited with status {proc.returncode} (see its output above)"}
        return json.loads(result.read_text())


def fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


COLUMNS = [("library", "library", "<10", "s"), ("params", "params", ">10", ",d"), ("steps", "steps", ">7", ",d"),
           ("steps_per_s", "steps/s", ">8", ".2f"), ("nfe", "NFE", ">4", "g"),
           ("images_per_s", "img/s", ">8", ".1f"), ("fd_digits", "FD", ">7", ".3f"),
           ("confidence", "conf", ">6", ".3f"), ("junk_rate", "junk", ">6", ".3f"),
           ("class_kl", "classKL", ">7", ".3f"), ("precision", "prec", ">5", ".2f"), ("recall", "recall", ">6", ".2f")]


def print_table(rows: list[dict]) -> None:
    print(" ".join(format(title, align) for _, title, align, _ in COLUMNS))
    for r in rows:
        cells = []
        for key, _, align, spec in COLUMNS:
            v = r.get(key)
            cells.append(format(v if key == "library" else fmt(v, spec), align))
        print(" ".join(cells))


def ratios(ours: dict, peer: dict) -> dict:
    def div(key):
        a, b = ours.get(key), peer.get(key)
        return a / b if a is not None and b else None

    return {"fd_ratio": div("fd_digits"), "images_per_s_ratio": div("images_per_s"),
            "steps_per_s_ratio": div("steps_per_s"), "params_ratio": div("params"),
            "junk_ratio": div("junk_rate"), "confidence_ratio": div("confidence")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="training budget per library (default 5)")
    p.add_argument("--n", type=int, default=500, help="samples per library (default 500)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every library (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nfe", type=int, default=20, help="network evaluations per sample (sampler steps; default 20)")
    p.add_argument("--sample-batch", type=int, default=256, help="sampling batch size (default 256, generate's)")
    p.add_argument("--libs", default=",".join(LIBS), help=f"comma-separated subset of {','.join(LIBS)}")
    p.add_argument("--ddpm-lr", type=float, default=8e-5, help="denoising-diffusion-pytorch lr (default 8e-5, its README)")
    p.add_argument("--ddpm-dim", type=int, help="its Unet width (default: the even one closest to diffusekit's params)")
    p.add_argument("--diffusers-lr", type=float, default=1e-4, help="diffusers lr (default 1e-4, train_unconditional.py)")
    p.add_argument("--diffusers-sampler", choices=("dpmsolver", "ddim"), default="dpmsolver")
    p.add_argument("--device", help="cpu, cuda ... (default: cuda if available, as diffusekit train)")
    p.add_argument("--out", help="write the table (and the ratios) as CSV here")
    p.add_argument("--grids", help="save a grid of the first 64 samples of each library in this folder")
    p.add_argument("--worker", choices=LIBS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.n < 4 or args.threads < 1 or args.nfe < 1 or args.sample_batch < 1:
        p.error("--minutes must be > 0, --n >= 4, --threads/--nfe/--sample-batch >= 1")

    if args.worker:
        try:
            rec = worker(args)
        except Exception as e:  # reported by the driver, which goes on with the next library
            traceback.print_exc()
            rec = {"library": args.worker, "error": f"{type(e).__name__}: {e}"}
        Path(args.result).write_text(json.dumps(rec))
        return 0

    libs = [s.strip() for s in args.libs.split(",") if s.strip()]
    unknown = [s for s in libs if s not in LIBS]
    if unknown:
        p.error(f"--libs: unknown {', '.join(unknown)}; valid: {', '.join(LIBS)}")
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"python {platform.python_version()}, torch {version('torch')}, diffusekit {version('diffusekit')}, "
          f"diffusers {version('diffusers')}, denoising-diffusion-pytorch {version('denoising-diffusion-pytorch')} "
          f"(ema-pytorch {version('ema-pytorch')}, einops {version('einops')}, accelerate {version('accelerate')})")
    print(f"budget {args.minutes:g} min per library, {args.threads} thread(s), seed {args.seed}, batch {BATCH}, "
          f"{args.n} samples at NFE {args.nfe} (sampling batch {args.sample_batch}), OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
          f"{os.cpu_count()} CPUs seen")
    print()
    for lib in libs:
        if lib in PEERS and version(PEERS[lib]) == "not installed":
            print(f"[{lib}] skipped: {PEERS[lib]} is not installed (a benchmark-only dependency; see the docstring)")
    libs = [lib for lib in libs if lib not in PEERS or version(PEERS[lib]) != "not installed"]
    rows = []
    for lib in libs:
        print(f"[{lib}] training for {args.minutes:g} min, then sampling {args.n} ...", flush=True)
        rec = run_worker_process(lib, args)
        if "skipped" in rec:
            print(f"[{lib}] skipped: {rec['skipped']}")
            continue
        if "error" in rec and "steps" not in rec:
            print(f"[{lib}] FAILED: {rec['error']}")
            continue
        if "error" in rec:
            print(f"[{lib}] scoring failed: {rec['error']}")
        print(f"[{lib}] {rec['steps']} steps, {rec['n']} samples in {rec['sample_s']:.1f} s", flush=True)
        rows.append(rec)

    if not rows:
        print("nothing ran")
        return 1
    print()
    print_table(rows)
    print()
    for r in rows:
        print(f"  {r['library']}: {r['recipe']}")
    ours = next((r for r in rows if r["library"] == "diffusekit"), None)
    ratio_rows = []
    if ours is not None:
        print()
        print("ratios diffusekit / peer (FD: lower is better, goal <= 0.7; sampling img/s: goal >= 1):")
        for peer in (r for r in rows if r["library"] != "diffusekit"):
            q = ratios(ours, peer)
            ratio_rows.append({"library": f"diffusekit/{peer['library']}", **q})
            fd_goal = "-" if q["fd_ratio"] is None else ("met" if q["fd_ratio"] <= 0.7 else "NOT met")
            speed_goal = "-" if q["images_per_s_ratio"] is None else ("met" if q["images_per_s_ratio"] >= 1 else "NOT met")
            print(f"  vs {peer['library']:<10} FD {fmt(q['fd_ratio'], '.3f')}x ({fd_goal}), "
                  f"sampling img/s {fmt(q['images_per_s_ratio'], '.2f')}x ({speed_goal}), "
                  f"train steps/s {fmt(q['steps_per_s_ratio'], '.2f')}x, params {fmt(q['params_ratio'], '.2f')}x, "
                  f"junk {fmt(q['junk_ratio'], '.2f')}x, confidence {fmt(q['confidence_ratio'], '.2f')}x")
    if args.out:
        keys = ["library", "params", "steps", "train_s", "train_wall_s", "steps_per_s", "nfe", "n", "sample_s",
                "images_per_s", *METRICS, "threads", "device", "recipe", "error",
                "fd_ratio", "images_per_s_ratio", "steps_per_s_ratio", "params_ratio", "junk_ratio", "confidence_ratio"]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            for r in rows + ratio_rows:
                w.writerow(r)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    from diffusekit._utils import run_script

    sys.exit(run_script(main))
