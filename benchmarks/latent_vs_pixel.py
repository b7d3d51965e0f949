"""Latent against pixel diffusion on the captioned shapes at 64x64, at equal wall-clock training time.

    python benchmarks/latent_vs_pixel.py [--ae-minutes 10] [--ae-crop 32] [--ae-only] [--minutes 10] [--n 128]
                                         [--out bench-latent]

1. `train-autoencoder` (small preset: 4x downsampling, 64x64x3 -> 16x16x4) for --ae-minutes on
   random --ae-crop crops of the 64x64 images (a quarter of the cost of a whole-image step), then
   its reconstruction PSNR on whole held-out shapes images (the held-out split: attribute pairs
   never seen in training), from posterior means. --ae-only stops here.
2. Two text-conditioned diffusion models (learned text encoder, U-Net preset `shapes`), each for
   --minutes of training: on pixels (64x64, 2x2 patches: a 32-16-8 pyramid) and on the autoencoder's
   latents (16x16, no patches: 16-8-4). A --minutes budget counts the run's setup, and the latent
   run's setup encodes the whole dataset: that encoding is timed once beforehand and added to the
   latent run's budget, so both train for --minutes; it is reported apart.
3. For each: training steps/s, sampling images/s (dpmpp_2m, 25 steps, guidance 3, latents decoded
   included), prompt adherence read back from the pixels by the shapes analyser (prompts of seen
   attribute pairs, on items the trainer never drew), and FD on 8x8 pixel features against real
   images (a layout/colour statistic; not FID).

Single-threaded by default (--threads); the numbers are for this CPU under whatever else runs.
"""

from __future__ import annotations

import sys
import argparse
import json
import time
from pathlib import Path

import torch

from diffusekit.data import ShapesDataset, load_dataset
from diffusekit.evaluate import pixel_features
from diffusekit.images import image_grid, save_image
from diffusekit.metrics import frechet_distance
from diffusekit.metrics.shapes import prompt_adherence
from diffusekit.pipelines import generate
from diffusekit.train import AutoencoderTrainConfig, TrainConfig, load, load_autoencoder, train, train_autoencoder
from diffusekit.images import psnr
from diffusekit.train.latent import LatentData
from diffusekit.train.loop import read_log

SIZE = 64


def heldout_psnr(ae_dir: Path, n: int, out: Path) -> float:
    ae, _ = load_autoencoder(ae_dir)
    x, _ = ShapesDataset(size=SIZE, split="heldout", length=n).batch(torch.arange(n))
    with torch.no_grad():
        recon = torch.cat([ae(x[i:i + 64], sample=False)[0] for i in range(0, n, 64)]).clamp(-1, 1)
    save_image(image_grid(torch.cat([x[:8], recon[:8], x[8:16], recon[8:16]]), columns=8), out / "reconstructions.png")
    return float(psnr(recon, x).mean())


def evaluate(run: Path, prompts: list[str], real: torch.Tensor, out: Path, name: str) -> dict:
    model = load(run)
    n = len(prompts)
    cond, uncond = model.conditioning(n, prompts=prompts)
    start = time.perf_counter()
    x = generate(model.denoiser, model.schedule, model.sample_shape, n, seed=0, sampler="dpmpp_2m", steps=25,
                 cond=cond, uncond=uncond, guidance=3.0, clip=model.sample_clip, batch_size=64)
    x = model.decode(x, check_scale=False)
    seconds = time.perf_counter() - start
    save_image(image_grid(x[:64], columns=8), out / f"samples-{name}.png")
    steps = model.config["step"]
    rate = steps / (model.config["train"]["minutes"] * 60)  # the run stops at its deadline
    adherence = prompt_adherence(x, prompts)
    return {"steps": steps, "train_steps_per_s": rate, "sample_images_per_s": n / seconds,
            "adherence_all": adherence["all"], "shape_colour": adherence["shape_colour"],
            "shape": adherence["shape"], "colour": adherence["colour"], "position": adherence["position"],
            "fd_pixels": frechet_distance(pixel_features(x), pixel_features(real))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ae-minutes", type=float, default=10.0)
    p.add_argument("--ae-crop", type=int, default=32, help="autoencoder training crops (64 = whole images)")
    p.add_argument("--ae-batch-size", type=int, default=16)
    p.add_argument("--ae-loss", choices=("l2", "l1"), default="l2")
    p.add_argument("--ae-whole-after", type=float, default=0.6,
                   help="train the autoencoder on whole images after this fraction of --ae-minutes (crops before)")
    p.add_argument("--ae-lr-schedule", choices=("constant", "cosine"), default="cosine",
                   help="cosine: decay to 0 over --ae-minutes (a constant 2e-3 spiked late in training)")
    p.add_argument("--ae-only", action="store_true", help="train and score the autoencoder only")
    p.add_argument("--ae-run", help="use this trained autoencoder run (a previous --out's autoencoder/) "
                   "instead of training one")
    p.add_argument("--minutes", type=float, default=10.0, help="training time of each diffusion model")
    p.add_argument("--n", type=int, default=128, help="samples per model")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench-latent")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}

    ae_dir = Path(args.ae_run) if args.ae_run else out / "autoencoder"
    t = time.perf_counter()
    if not args.ae_run:
        train_autoencoder(AutoencoderTrainConfig(data="shapes", resolution=SIZE, preset="small", lr=2e-3,
                                                 batch_size=args.ae_batch_size, crop=args.ae_crop, loss=args.ae_loss,
                                                 lr_schedule=args.ae_lr_schedule, whole_after=args.ae_whole_after,
                                                 minutes=args.ae_minutes, checkpoint_every=10**6, sample_every=10**6,
                                                 log_every=10,
                                                 out=str(ae_dir)), overwrite=True, progress=False)
    steps = load_autoencoder(ae_dir)[1]["step"]  # first: a wrong --ae-run fails with load_autoencoder's one-line error
    ae_log = read_log(ae_dir / "log.jsonl")
    results["autoencoder"] = {"steps": steps, "train_psnr": ae_log[-1]["psnr"],
                              "latent_std": ae_log[-1]["latent_std"], "minutes": (time.perf_counter() - t) / 60,
                              "heldout_psnr": heldout_psnr(ae_dir, 256, out)}
    print(json.dumps(results["autoencoder"]), flush=True)
    if args.ae_only:
        (out / "results.json").write_text(json.dumps(results, indent=2))
        return

    # the widths the recorded results were trained with (the preset's 4x4 level has 64 channels since)
    common = dict(data="shapes", resolution=SIZE, preset="shapes", block_out_channels=(32, 64, 128),
                  text_encoder="learned", batch_size=args.batch_size,
                  minutes=args.minutes, checkpoint_every=10**6, sample_every=10**6, num_samples=16,
                  log_every=10)
    t = time.perf_counter()
    LatentData(load_dataset("shapes", SIZE), load_autoencoder(str(ae_dir), "cpu")[0], "cpu")
    encode_minutes = (time.perf_counter() - t) / 60
    timings = {}
    for name, extra in (("pixel", {}), ("latent", {"autoencoder": str(ae_dir), "minutes": args.minutes + encode_minutes})):
        t = time.perf_counter()
        train(TrainConfig(out=str(out / name), **{**common, **extra}), overwrite=True, progress=False)
        timings[name] = time.perf_counter() - t
    prompts = ShapesDataset(size=SIZE, split="train", length=10**9).captions(range(1_000_000, 1_000_000 + args.n))
    real, _ = ShapesDataset(size=SIZE, split="train", length=10**9).batch(torch.arange(2_000_000, 2_000_000 + 1000))
    for name in ("pixel", "latent"):
        results[name] = evaluate(out / name, prompts, real, out, name)
        results[name]["wall_minutes"] = timings[name] / 60
        print(name, json.dumps(results[name]), flush=True)
    results["latent"]["encode_minutes"] = encode_minutes

    a, px, lt = results["autoencoder"], results["pixel"], results["latent"]
    print(f"\nautoencoder (small, f=4, 16x16x4 latents): {a['steps']} steps, "
          f"train PSNR {a['train_psnr']:.2f} dB, held-out PSNR {a['heldout_psnr']:.2f} dB (goal >= 28), "
          f"latent std {a['latent_std']:.3f}")
    print(f"\n{'model':8} {'steps':>6} {'steps/s':>8} {'img/s':>7} {'adh.all':>8} {'shp+col':>8} {'shape':>6} "
          f"{'colour':>7} {'pos':>6} {'FD px':>8}")
    for name, r in (("pixel", px), ("latent", lt)):
        print(f"{name:8} {r['steps']:>6} {r['train_steps_per_s']:>8.3f} {r['sample_images_per_s']:>7.2f} "
              f"{r['adherence_all']:>8.3f} {r['shape_colour']:>8.3f} {r['shape']:>6.3f} {r['colour']:>7.3f} "
              f"{r['position']:>6.3f} {r['fd_pixels']:>8.3f}")
    print(f"\nlatent / pixel: sampling {lt['sample_images_per_s'] / px['sample_images_per_s']:.2f}x (goal >= 3), "
          f"training steps/s {lt['train_steps_per_s'] / px['train_steps_per_s']:.2f}x, adherence "
          f"{lt['adherence_all']:.3f} vs {px['adherence_all']:.3f}, FD {lt['fd_pixels']:.3f} vs {px['fd_pixels']:.3f} "
          f"(quality goal: no worse)")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    from diffusekit._utils import run_script

    sys.exit(run_script(main))
