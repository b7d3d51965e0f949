"""Editing benchmarks (issue 9): inpainting, super-resolution and the text-to-image cascade.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/editing.py --part all --minutes 12 --sr-minutes 12

Three parts, each selectable with --part (inpaint, superres, cascade, all):

inpaint   A class-unconditional model of MNIST (or, --inpaint-data digits, scikit-learn's 8x8
          digits) fills held-out digits (the shipped classifier's held-out split; the model is
          trained on the classifier's *training* split only, written as PNGs to the work folder,
          so it never saw them) with the centre or the right half masked. RePaint (jump_length /
          resample, DDPM's sampler by default) against replace-only (same sampler, same steps),
          each also with reconstruction guidance (--reconstruction). Score: the classifier's
          accuracy (top class of all 11, so "not a digit" counts as wrong) of the filled images
          against the originals' labels; the masked inputs (masked pixels set to black
          background, and to mid-grey) are the floor, the originals the ceiling.
superres  An SR3 model (--task superres --scale 2, trained on the same training split) upscales
          the held-out digits degraded to 14x14 (2x2 box filter), at augmentation level 0, against
          bicubic upsampling: PSNR (mean dB against the originals) and classifier accuracy.
cascade   A MiniLM text-conditioned shapes base model at 32x32 and a text-conditioned 32 -> 64 SR
          stage; prompt adherence (metrics.shapes) of the cascade's 64x64 outputs against the base
          model's 32x32 outputs for the same held-out-item prompts.

Models are trained into --work (default /tmp/diffusekit-editing; nothing is written into the repo)
unless an existing run is named (--gen-run, --sr-run, --base-run, --cascade-sr-run), so a rerun
need not retrain; --train-only trains what the chosen parts need and stops. Image grids for a look
by eye go to --work as well.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Models: train (into the work folder) or reuse
# ---------------------------------------------------------------------------------------------


def train_split_folder(work: Path, dataset: str) -> Path:
    """The classifier's training split of `dataset` (mnist or digits) as PNGs, so that a run trained
    on this folder never sees the held-out digits the benchmark scores. Lossless for MNIST (8-bit);
    the 17 grey levels of scikit-learn's digits move by under half an 8-bit step."""
    from diffusekit.images import save_image, tensor_to_pil
    from diffusekit.metrics.classifier import load_split

    folder = work / f"{dataset}_train"
    images = load_split(dataset)["train_images"]
    done = folder / ".complete"
    if done.exists() and int(done.read_text()) == len(images):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(images):
        save_image(tensor_to_pil(x), folder / f"{i:05d}.png")
    done.write_text(str(len(images)))
    _log(f"wrote the {len(images)} training-split {dataset} digits to {folder}")
    return folder


def train_run(out: Path, minutes: float, **settings) -> Path:
    from diffusekit.train import TrainConfig, train

    cfg = TrainConfig(out=str(out), minutes=minutes, device="cpu", sample_every=10**9, checkpoint_every=10**9,
                      **settings)
    _log(f"training {out} for {minutes} min: {settings}")
    start = time.perf_counter()
    path = train(cfg, overwrite=True, progress=False)
    _log(f"trained {path} in {(time.perf_counter() - start) / 60:.1f} min")
    return Path(path)


def describe_run(path) -> str:
    """'N steps' from the run's checkpoint folder name (step-00000667), best effort."""
    from diffusekit.train.checkpoint import resolve_checkpoint

    try:
        return f"{int(resolve_checkpoint(path).name.split('-')[-1])} steps"
    except Exception:  # noqa: BLE001 - only a description
        return "steps unknown"


def get_run(args, name: str, given: str | None, minutes: float, settings) -> Path:
    """`given` if named, else a fresh run in the work folder trained with `settings(args)`."""
    if given:
        return Path(given)
    return train_run(Path(args.work) / name, minutes, lr_schedule=args.lr_schedule, **settings(args))


def digits_settings(args, dataset: str) -> dict:
    side = {"mnist": 28, "digits": 8}[dataset]
    return dict(data=str(train_split_folder(Path(args.work), dataset)), channels=1, resolution=side, preset=dataset,
                seed=args.seed)


def gen_settings(args) -> dict:
    return digits_settings(args, args.inpaint_data)


def sr_settings(args) -> dict:
    return dict(digits_settings(args, "mnist"), task="superres", scale=2)


def shapes_sr_settings(args) -> dict:
    return dict(data="shapes", resolution=32, task="superres", scale=2, seed=args.seed)


def base_settings(args) -> dict:
    return dict(data="shapes", text_encoder="minilm", seed=args.seed)


def cascade_sr_settings(args) -> dict:
    return dict(data="shapes", resolution=64, task="superres", scale=2, text_encoder="minilm", seed=args.seed,
                crop=args.cascade_sr_crop, whole_after=args.cascade_sr_whole_after)



# ---------------------------------------------------------------------------------------------
# Scoring and pictures
# ---------------------------------------------------------------------------------------------


def classify(images, dataset: str = "mnist") -> dict:
    """The shipped classifier of `dataset` on [N, 1, H, W] images in [-1, 1]: per image the top class
    of all 11 (10 = "not a digit") and the top digit with junk ignored."""
    from diffusekit.metrics.digits import digit_features

    _, probs = digit_features(images.clamp(-1, 1), dataset)
    return {"top": probs.argmax(1), "top10": probs[:, :10].argmax(1)}


def scores(images, labels, dataset: str = "mnist") -> dict:
    c = classify(images, dataset)
    return {"acc": float((c["top"] == labels).double().mean()), "acc10": float((c["top10"] == labels).double().mean()),
            "junk": float((c["top"] == 10).double().mean())}


def save_rows(rows: list, path: Path, columns: int = 16) -> None:
    """Rows of images (each [>= columns, C, H, W], same C) as one grid: a row per tensor."""
    from diffusekit.images import image_grid, save_image

    tiles = torch.cat([r[:columns].clamp(-1, 1) for r in rows])
    save_image(image_grid(tiles, columns=columns), path)
    _log(f"wrote {path}")


def heldout_digits(n: int, dataset: str = "mnist"):
    from diffusekit.metrics.classifier import load_split

    split = load_split(dataset)
    if n > len(split["heldout_images"]):
        raise ValueError(f"--n {n}: the held-out split has {len(split['heldout_images'])} digits")
    return split["heldout_images"][:n], split["heldout_labels"][:n]


# ---------------------------------------------------------------------------------------------
# Part 1: inpainting
# ---------------------------------------------------------------------------------------------


def make_mask(kind: str, side: int = 28) -> torch.Tensor:
    """[1, 1, side, side], 1 = fill: the middle 14x14 ("centre") or the columns right of the middle."""
    mask = torch.zeros(1, 1, side, side)
    if kind == "centre":
        lo = side // 4
        mask[..., lo:lo + side // 2, lo:lo + side // 2] = 1
    elif kind == "right":
        mask[..., side // 2:] = 1
    else:
        raise ValueError(kind)
    return mask


def bench_inpaint(args, run: Path) -> list[dict]:
    from diffusekit.pipelines.edit import inpaint, repaint_path
    from diffusekit.train import load

    model = load(run)
    data = args.inpaint_data
    images, labels = heldout_digits(args.n, data)
    path = repaint_path(args.steps, args.jump_length, args.resample)
    repaint_nfe = sum(b > a for a, b in zip(path, path[1:]))
    rows = []
    ceiling = scores(images, labels, data)
    for kind in args.masks:
        mask = make_mask(kind, images.shape[-1])
        black = torch.where(mask.bool(), torch.full_like(images, -1.0), images)
        grey = torch.where(mask.bool(), torch.zeros_like(images), images)
        filled = {}
        rows.append(dict(mask=kind, method="original (ceiling)", **ceiling))
        rows.append(dict(mask=kind, method="masked, black (floor)", **scores(black, labels, data)))
        rows.append(dict(mask=kind, method="masked, grey (floor)", **scores(grey, labels, data)))
        variants = ([] if args.guided_only else [(m, 0.0) for m in args.methods]) + \
            [(m, args.reconstruction) for m in args.methods if args.reconstruction > 0]
        for method, weight in variants:
            start = time.perf_counter()
            out = inpaint(model.denoiser, model.schedule, images, mask, method=method, sampler=args.sampler,
                          steps=args.steps, jump_length=args.jump_length, resample=args.resample, seed=args.seed,
                          clip=model.sample_clip, reconstruction=weight)
            seconds = time.perf_counter() - start
            kept = (out - images)[(~mask.bool()).expand_as(images)].abs().max().item()
            nfe = repaint_nfe if method == "repaint" else args.steps
            label = (f"RePaint j{args.jump_length} r{args.resample}" if method == "repaint" else "replace")
            label += f" + recon {weight:g}" if weight else ""
            filled[label] = out
            rows.append(dict(mask=kind, method=label, **scores(out, labels, data), nfe=nfe, seconds=seconds, kept=kept))
            _log(f"{kind} {label}: acc {rows[-1]['acc']:.3f} ({seconds:.0f} s, known region max |diff| {kept:.2g})")
        save_rows([images, grey, *filled.values()], Path(args.work) / f"inpaint_{kind}.png")
    print()
    print(f"Inpainting {args.n} held-out {data} digits (the classifier's held-out split; model {run}, "
          f"{describe_run(run)}); {args.sampler}, {args.steps}-step karras schedule, seed {args.seed}")
    print("acc: classifier's top class of 11 (junk = wrong) is the original's label; acc10: junk class ignored; "
          "junk: rated not-a-digit")
    print(f"{'mask':7} {'method':30} {'acc':>6} {'acc10':>6} {'junk':>6} {'NFE':>5} {'s':>6}")
    for r in rows:
        nfe = f"{r['nfe']:5d}" if "nfe" in r else " " * 5
        sec = f"{r['seconds']:6.0f}" if "seconds" in r else " " * 6
        print(f"{r['mask']:7} {r['method']:30} {r['acc']:6.3f} {r['acc10']:6.3f} {r['junk']:6.3f} {nfe} {sec}")
    print()
    return rows


# ---------------------------------------------------------------------------------------------
# Part 2: super-resolution
# ---------------------------------------------------------------------------------------------


def bench_superres(args, run: Path) -> list[dict]:
    from diffusekit.pipelines.superres import degrade, psnr, superres_settings, upsample, upscale
    from diffusekit.train import load

    model = load(run)
    scale = superres_settings(model)["scale"]
    images, labels = heldout_digits(args.sr_n)
    low = degrade(images, scale)
    size = tuple(images.shape[-2:])
    start = time.perf_counter()
    sr = upscale(model.denoiser, model.schedule, low, scale, aug=0.0, seed=args.seed, sampler=args.sr_sampler,
                 steps=args.sr_steps, clip=model.sample_clip).clamp(-1, 1)
    seconds = time.perf_counter() - start
    outputs = {"bicubic": upsample(low, size), f"SR3 (aug 0, {args.sr_sampler} {args.sr_steps})": sr,
               "nearest": torch.nn.functional.interpolate(low, size=size, mode="nearest")}
    rows = [dict(method="original (ceiling)", psnr=float("inf"), consistency=float("inf"), **scores(images, labels))]
    for name, out in outputs.items():
        rows.append(dict(method=name, psnr=float(psnr(out, images).mean()),
                         consistency=float(psnr(degrade(out, scale), low).mean()), **scores(out, labels)))
    save_rows([torch.nn.functional.interpolate(low, size=size, mode="nearest"), outputs["bicubic"], sr, images],
              Path(args.work) / "superres.png")
    print()
    print(f"2x super-resolution of {args.sr_n} held-out MNIST digits (14x14 box-filtered -> 28x28; model {run}, "
          f"{describe_run(run)}; SR sampling {seconds:.0f} s)")
    print("PSNR: mean over images, dB against the originals; re-down PSNR: the output box-downsampled again "
          "against the 14x14 input; acc as in part 1")
    print(f"{'method':32} {'PSNR':>7} {'re-down':>8} {'acc':>6} {'acc10':>6} {'junk':>6}")
    for r in rows:
        print(f"{r['method']:32} {r['psnr']:7.2f} {r['consistency']:8.2f} {r['acc']:6.3f} {r['acc10']:6.3f} "
              f"{r['junk']:6.3f}")
    print()
    return rows


def bench_superres_shapes(args, run: Path) -> list[dict]:
    """2x super-resolution (16 -> 32 px) of shapes drawings the model never saw (another seed of the
    generator): PSNR against the originals, and the analyser's reading of each upscale against the
    drawing's caption (attributes a blurry upscale loses: size, shape)."""
    from diffusekit.data.shapes import ShapesDataset
    from diffusekit.metrics.shapes import prompt_adherence
    from diffusekit.pipelines.superres import degrade, psnr, superres_settings, upsample, upscale
    from diffusekit.train import load

    model = load(run)
    scale = superres_settings(model)["scale"]
    held = ShapesDataset(size=32, split="train", seed=args.seed + 1, length=args.sr_n)
    idx = torch.arange(args.sr_n)
    images, captions = held.batch(idx)[0], held.captions(idx)
    low = degrade(images, scale)
    start = time.perf_counter()
    sr = upscale(model.denoiser, model.schedule, low, scale, aug=0.0, seed=args.seed, sampler=args.sr_sampler,
                 steps=args.sr_steps, clip=model.sample_clip).clamp(-1, 1)
    seconds = time.perf_counter() - start
    outputs = {"original (ceiling)": images, "bicubic": upsample(low, (32, 32)),
               f"SR3 (aug 0, {args.sr_sampler} {args.sr_steps})": sr}
    rows = []
    for name, out in outputs.items():
        adherence = prompt_adherence(out, captions)
        rows.append(dict(method=name, psnr=float(psnr(out, images).mean()), **adherence))
    save_rows([torch.nn.functional.interpolate(low, size=(32, 32), mode="nearest"), outputs["bicubic"], sr, images],
              Path(args.work) / "superres_shapes.png")
    keys = [k for k in rows[0] if k not in ("method", "psnr") and isinstance(rows[0][k], float)]
    print()
    print(f"2x super-resolution of {args.sr_n} unseen shapes drawings (16x16 box-filtered -> 32x32; model {run}, "
          f"{describe_run(run)}; SR sampling {seconds:.0f} s); analyser scores against each drawing's caption")
    print(f"{'method':32} {'PSNR':>7} " + " ".join(f"{k:>13}" for k in keys))
    for r in rows:
        psnr_text = "inf" if r["method"].startswith("original") else f"{r['psnr']:.2f}"
        print(f"{r['method']:32} {psnr_text:>7} " + " ".join(f"{r[k]:13.3f}" for k in keys))
    print()
    return rows


# ---------------------------------------------------------------------------------------------
# Part 3: the cascade
# ---------------------------------------------------------------------------------------------


def bench_cascade(args, base_run: Path, sr_run: Path) -> list[dict]:
    from diffusekit.data.shapes import ShapesDataset
    from diffusekit.metrics.shapes import prompt_adherence
    from diffusekit.pipelines.superres import cascade
    from diffusekit.train import load

    base, sr = load(base_run), load(sr_run)
    # seen (shape, colour) pairs, items past the 10,000 the trainer draws from: captions it never saw
    data32, data64 = ShapesDataset(32, "train"), ShapesDataset(64, "train")
    index = range(10_000, 10_000 + args.cascade_n)
    prompts = [data32.describe(i)[1] for i in index]
    real32 = torch.stack([data32[i][0] for i in index])
    real64 = torch.stack([data64[i][0] for i in index])
    options = dict(sampler="dpmpp_2m", steps=25, threshold=0.995)
    start = time.perf_counter()
    low, high = cascade(base, sr, args.cascade_n, prompts=prompts, seed=args.seed, aug=args.cascade_aug,
                        base_options=dict(options, guidance=args.cascade_guidance),
                        sr_options=dict(options, guidance=1.0))
    seconds = time.perf_counter() - start
    rows = []
    for name, images in (("real 32x32 (analyser ceiling)", real32), ("real 64x64 (analyser ceiling)", real64),
                         ("base model 32x32", low), ("cascade 64x64", high),
                         ("base 32x32, bicubic to 64", torch.nn.functional.interpolate(
                             low, size=(64, 64), mode="bicubic", align_corners=False).clamp(-1, 1))):
        rows.append(dict(images=name, **prompt_adherence(images, prompts)))
    save_rows([torch.nn.functional.interpolate(low, size=(64, 64), mode="nearest"), high, real64],
              Path(args.work) / "cascade.png", columns=min(16, args.cascade_n))
    print()
    print(f"Cascade: {args.cascade_n} prompts (seen pairs, unseen items); base {base_run} ({describe_run(base_run)}), "
          f"SR {sr_run} ({describe_run(sr_run)}); dpmpp_2m 25 steps each, dynamic threshold 0.995, "
          f"guidance {args.cascade_guidance} / 1, aug {args.cascade_aug}; {seconds:.0f} s")
    keys = ("all", "shape_colour", "shape", "colour", "size", "position", "count")
    print(f"{'images':32} " + " ".join(f"{k:>12}" for k in keys))
    for r in rows:
        print(f"{r['images']:32} " + " ".join(f"{r[k]:12.3f}" for k in keys))
    print()
    return rows


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

PARTS = ("inpaint", "superres", "superres-shapes", "cascade")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="editing.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=PARTS + ("all",), default="all")
    p.add_argument("--work", default="/tmp/diffusekit-editing", help="run folders, training PNGs and image grids")
    p.add_argument("--train-only", action="store_true", help="train the models the chosen parts need, then stop")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    # part 1
    p.add_argument("--inpaint-data", choices=("mnist", "digits"), default="mnist",
                   help="inpaint: MNIST 28x28 (default) or scikit-learn's 8x8 digits")
    p.add_argument("--gen-run", help="inpaint: an existing unconditional run on --inpaint-data (else train one)")
    p.add_argument("--minutes", type=float, default=12, help="inpaint: training budget of that model")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="cosine",
                   help="learning rate of the models trained here (cosine: decays over the budget)")
    p.add_argument("--n", type=int, default=200, help="inpaint: held-out digits per mask")
    p.add_argument("--sampler", default="ddpm", help="inpaint: sampler of both methods (default ddpm)")
    p.add_argument("--steps", type=int, default=50, help="inpaint: sigma-schedule steps of both methods")
    p.add_argument("--jump-length", type=int, default=10)
    p.add_argument("--resample", type=int, default=10)
    p.add_argument("--masks", nargs="+", default=["centre", "right"], choices=["centre", "right"])
    p.add_argument("--methods", nargs="+", default=["repaint", "replace"], choices=["repaint", "replace"])
    p.add_argument("--reconstruction", type=float, default=20.0,
                   help="inpaint: also run each method with reconstruction guidance of this weight (0: skip)")
    p.add_argument("--guided-only", action="store_true", help="inpaint: only the runs with reconstruction guidance")
    # part 2
    p.add_argument("--sr-run", help="superres: an existing MNIST --task superres --scale 2 run (else train one)")
    p.add_argument("--sr-minutes", type=float, default=12)
    p.add_argument("--sr-n", type=int, default=500, help="superres: held-out digits")
    p.add_argument("--sr-sampler", default="dpmpp_2m")
    p.add_argument("--sr-steps", type=int, default=25)
    p.add_argument("--shapes-sr-run", help="superres-shapes: an existing shapes 32px --task superres run")
    # part 3
    p.add_argument("--base-run", help="cascade: an existing shapes --text-encoder minilm run at 32x32")
    p.add_argument("--base-minutes", type=float, default=8)
    p.add_argument("--cascade-sr-run", help="cascade: an existing shapes 64x64 superres minilm run")
    p.add_argument("--cascade-sr-minutes", type=float, default=8)
    p.add_argument("--cascade-sr-crop", type=int, default=32,
                   help="cascade: the SR stage trains on crops of this side (a 64x64 step is 4x dearer)")
    p.add_argument("--cascade-sr-whole-after", type=float, default=0.6,
                   help="cascade: ... and on whole images after this fraction of its budget")
    p.add_argument("--cascade-n", type=int, default=64, help="cascade: prompts (one image each)")
    p.add_argument("--cascade-aug", type=float, default=0.1, help="cascade: augmentation level of the base samples")
    p.add_argument("--cascade-guidance", type=float, default=3.0, help="cascade: guidance of both stages")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    parts = PARTS if args.part == "all" else (args.part,)
    _log(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
         f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, parts: {', '.join(parts)}")
    runs = {}
    if "inpaint" in parts:
        runs["gen"] = get_run(args, f"{args.inpaint_data}_gen", args.gen_run, args.minutes, gen_settings)
    if "superres" in parts:
        runs["sr"] = get_run(args, "mnist_sr", args.sr_run, args.sr_minutes, sr_settings)
    if "superres-shapes" in parts:
        runs["shapes_sr"] = get_run(args, "shapes_sr32", args.shapes_sr_run, args.sr_minutes, shapes_sr_settings)
    if "cascade" in parts:
        runs["base"] = get_run(args, "shapes_base", args.base_run, args.base_minutes, base_settings)
        runs["cascade_sr"] = get_run(args, "shapes_sr64", args.cascade_sr_run, args.cascade_sr_minutes,
                                     cascade_sr_settings)
    for name, path in runs.items():
        _log(f"run {name}: {path} ({describe_run(path)})")
    if args.train_only:
        return
    if "inpaint" in parts:
        bench_inpaint(args, runs["gen"])
    if "superres" in parts:
        bench_superres(args, runs["sr"])
    if "superres-shapes" in parts:
        bench_superres_shapes(args, runs["shapes_sr"])
    if "cascade" in parts:
        bench_cascade(args, runs["base"], runs["cascade_sr"])


if __name__ == "__main__":
    from diffusekit._utils import run_script

    sys.exit(run_script(main))
