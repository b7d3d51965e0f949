"""The `diffusekit` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .evaluate import add_eval_parser
from .pipelines.edit import add_edit_parsers
from .pipelines.stable_diffusion import add_stable_diffusion_parsers
from .pipelines.superres import add_superres_parsers
from .schedules import BETA_SCHEDULES, NoiseSchedule


def _forward(args) -> None:
    from .data import load_digits
    from .images import load_image, pil_to_tensor, save_image
    from .visualize import forward_frames, strip_image

    schedule = NoiseSchedule.from_name(args.schedule, args.num_steps, zero_terminal_snr=args.zero_terminal_snr)
    if args.image is None:
        images, labels = load_digits()
        if not 0 <= args.index < len(images):
            raise ValueError(f"--index must lie in 0..{len(images) - 1}")
        x0, source = images[args.index], f"digits[{args.index}] (label {int(labels[args.index])})"
    else:
        image = load_image(args.image, "L" if args.grey else "RGB")
        side = min(image.size)  # centre-crop to a square, then resize
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((args.size, args.size), 3)
        x0, source = pil_to_tensor(image), args.image
    if args.every < 1:
        raise ValueError("--every must be >= 1")
    steps = list(range(0, schedule.num_steps + 1, args.every))
    if steps[-1] != schedule.num_steps:
        steps.append(schedule.num_steps)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed))
    frames = forward_frames(x0, schedule, steps, noise)
    save_image(strip_image(frames), args.output)
    print(f"forward process of {source}, schedule {schedule.name}, T={schedule.num_steps}")
    print(f"{'t':>6} {'abar':>10} {'SNR':>10} {'SNR dB':>8}")
    for f in frames:
        db = "inf" if f.snr == float("inf") else ("-inf" if f.snr == 0 else f"{10 * torch.tensor(f.snr).log10():.1f}")
        print(f"{f.t:>6} {f.alpha_cumprod:>10.4g} {f.snr:>10.4g} {db:>8}")
    print(f"wrote {args.output}")


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 32,64,128, got {text!r}") from None


def _train(args) -> None:
    from dataclasses import fields

    from .train import TrainConfig, train

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    if args.steps is None and args.minutes is None and not args.resume:
        given["minutes"] = 4.0  # the default budget: a few minutes on a laptop CPU
    run_dir = train(TrainConfig(**given), resume=args.resume, overwrite=args.overwrite, given=set(given))
    print(f"run saved in {run_dir}: samples.png, loss.png, log.jsonl, checkpoints/")
    if given.get("task") == "superres":
        print(f"upscale with it: diffusekit upscale {run_dir} --image small.png -o large.png")
    else:
        print(f"sample from it: diffusekit sample {run_dir} -o grid.png")


def _sample(args) -> None:
    from .images import image_grid, save_image, tensor_to_pil
    from .pipelines import generate
    from .train import load

    if args.n < 1:
        raise ValueError("--n must be >= 1")
    if args.guidance < 0:
        raise ValueError(f"--guidance must be >= 0 (1 = no guidance), got {args.guidance}")
    prompts = list(args.prompt or [])
    if args.prompt_file:
        lines = Path(args.prompt_file).read_text().splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise ValueError(f"{args.prompt_file} holds no prompts (one per line)")
    model = load(args.run_dir, device=args.device or "cpu")
    if model.config.get("superres"):
        raise ValueError(f"{model.path} is a super-resolution model: it needs a low-resolution image, "
                         "use `diffusekit upscale` (or `diffusekit cascade` after a base model)")
    device = args.device or "cpu"
    cond, uncond = model.conditioning(args.n, class_labels=args.class_label, prompts=prompts or None,
                                      negative_prompt=args.negative_prompt, device=device)
    guidance = args.guidance if cond is not None else 1.0
    x = generate(model.denoiser, model.schedule, model.sample_shape, args.n, seed=args.seed, sampler=args.sampler,
                 steps=args.steps, spacing=args.spacing, device=device, progress=True, cond=cond, uncond=uncond,
                 guidance=guidance, guidance_rescale=args.guidance_rescale, guidance_interval=args.guidance_interval,
                 threshold=args.threshold, clip=None if args.no_clip else model.sample_clip)
    x = model.decode(x, check_scale=False)  # latent models: through their autoencoder
    save_image(image_grid(x), args.output)
    if args.save_individual:
        folder = Path(args.save_individual)
        for i, image in enumerate(x):
            save_image(tensor_to_pil(image), folder / f"{args.seed}-{i:05d}.png")
    print(f"wrote {args.output} ({args.n} samples, {args.sampler}, {args.steps} steps, seed {args.seed}) from {model.path}")


def _bench(args) -> None:
    from .bench import samplers as bench_samplers
    from .schedule_opt import Calibration

    calibration = Calibration(num_samples=args.calibration_samples, reference_steps=args.reference_steps,
                              mining=args.calibration_mining, dtype=torch.float64)
    peers = False if args.peers is None else (args.peers or True)  # --peers alone: every peer
    bench_samplers.run(mixtures=args.mixture or bench_samplers.DEFAULT_MIXTURES, schedule=args.schedule,
                       nfes=args.nfe, samples=args.samples, samplers=args.samplers, spacings=args.spacings,
                       opt_samplers=args.opt_samplers, peers=peers, out_dir=args.out_dir, seed=args.seed,
                       top=args.top, calibration=calibration, fit_nfes=args.fit_nfe)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusekit", description="Diffusion models end to end.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("forward", help="picture the forward (noising) process as a strip of frames")
    p.add_argument("image", nargs="?", help="an image file (default: a digit from the embedded data)")
    p.add_argument("-o", "--output", default="forward.png", help="output PNG (default: forward.png)")
    p.add_argument("--schedule", default="linear", choices=list(BETA_SCHEDULES), help="noise schedule")
    p.add_argument("--num-steps", type=int, default=1000, help="training steps T (default 1000)")
    p.add_argument("--zero-terminal-snr", action="store_true", help="rescale to zero terminal SNR")
    p.add_argument("--every", type=int, default=100, help="frame every N steps (default 100)")
    p.add_argument("--index", type=int, default=0, help="which embedded digit (default 0)")
    p.add_argument("--size", type=int, default=64, help="side of the square a given image is resized to")
    p.add_argument("--grey", action="store_true", help="read the image as greyscale")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_forward)

    from .data import DATASETS
    from .forward import WEIGHTINGS
    from .nn.unet import PRESETS
    from .train.core import LR_SCHEDULES

    p = sub.add_parser("train", help="train a diffusion model (default: on the embedded digits)")
    p.add_argument("--data", help=f"{', '.join(DATASETS)} or a folder of images (default digits)")
    p.add_argument("--out", help="run folder (default runs/<data>)")
    p.add_argument("--preset", choices=list(PRESETS), help="U-Net size (default: digits, mnist or shapes to fit the data; digits for folders)")
    p.add_argument("--block-out-channels", type=_int_tuple, metavar="C1,C2,...",
                   help="U-Net widths per level, e.g. 32,64,128 (default: the preset's)")
    p.add_argument("--resolution", type=int, help="image side (default: the data's own; 32 for folders)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="grey (1) or RGB (3) for image folders")
    p.add_argument("--steps", type=int, help="optimizer steps to train for")
    p.add_argument("--minutes", type=float, help="wall-clock budget from the command's start, setup included "
                   "(default 4 when --steps is not given)")
    p.add_argument("--batch-size", type=int, help="global batch size (default 64)")
    p.add_argument("--grad-accum", type=int, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="after warm-up: a cosine decay to 0 over "
                   "the --steps/--minutes budget (default) or constant")
    p.add_argument("--adam-eps", type=float)
    p.add_argument("--adam-beta2", type=float, help="AdamW's second-moment decay "
                   "(default 0.999; 0.99 for text-to-image)")
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--ema-decay", type=float)
    p.add_argument("--dropout", type=float)
    p.add_argument("--schedule", help="noise schedule (default cosine; linear, scaled_linear, sigmoid)")
    p.add_argument("--prediction", help="v (default), eps or x0")
    p.add_argument("--class-conditional", action="store_true", default=None,
                   help="condition on the data's labels (with label dropout for guidance)")
    p.add_argument("--text-encoder", help="condition on captions: minilm (packaged, frozen), learned (trained jointly) or clip:PATH")
    p.add_argument("--autoencoder", metavar="AE_DIR", help="latent diffusion: train on the latents of this "
                   "train-autoencoder run (embedded in the run, with a scale factor estimated from the data)")
    p.add_argument("--task", choices=("generate", "superres"),
                   help="generate (default) or superres: an SR3 model that upscales the data by --scale")
    p.add_argument("--scale", type=int, help="superres: the upscaling factor (default 2)")
    p.add_argument("--crop", type=int, metavar="SIDE", help="superres: train on random SIDE x SIDE crops "
                   "(cheaper steps; the model still upscales whole images)")
    p.add_argument("--whole-after", type=float, metavar="FRACTION", help="with --crop: train on whole images "
                   "once this fraction of the budget is spent, so normalisation sees whole images")
    p.add_argument("--aug-max", type=float, help="superres: highest noise-conditioning augmentation level in "
                   "training, a fraction of the schedule (default 0.5)")
    p.add_argument("--cond-dropout", type=float, help="how often labels/captions are dropped (default 0.1)")
    p.add_argument("--sample-guidance", type=float, help="guidance scale of the preview grids (default 3)")
    p.add_argument("--weighting", choices=WEIGHTINGS, help="loss weighting over noise levels (default min_snr)")
    p.add_argument("--snr-floor", type=float, help="min_snr: lowest x0-space weight, at high noise where the "
                   "layout is decided (default 0.1 for text-to-image models, 0 otherwise)")
    p.add_argument("--precision", help="fp32, bf16 or fp16 (CUDA)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the U-Net for "
                   "training: fewer, fused kernels after a one-time compilation (2-3 minutes on a CPU, "
                   "cached on disk)")
    p.add_argument("--flip", action="store_true", default=None, help="random horizontal flips")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--sample-every", type=int)
    p.add_argument("--save-minutes", type=float, help="also checkpoint and sample every this many minutes")
    p.add_argument("--log-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.set_defaults(run=_train)

    from .train.autoencoder import add_parser as add_autoencoder_parser

    add_autoencoder_parser(sub)

    p = sub.add_parser("sample", help="draw samples from a trained run into a grid image")
    p.add_argument("run_dir", metavar="RUN", help="run folder or checkpoint folder")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--sampler", default="dpmpp_2m", help="any registered sampler (default dpmpp_2m)")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (default 25)")
    p.add_argument("--no-clip", action="store_true", help="do not clamp denoised estimates to [-1, 1]")
    p.add_argument("--spacing", default="karras", help="sigma spacing (default karras)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default="grid.png")
    p.add_argument("--save-individual", metavar="DIR", help="also write each sample as its own PNG")
    p.add_argument("--class", dest="class_label", type=int, nargs="+", metavar="K",
                   help="class-conditional models: the class(es) to draw, cycled over the samples")
    p.add_argument("--prompt", action="append", help="text models: a prompt (repeat for several; cycled over the "
                   "samples; an empty prompt is unconditional)")
    p.add_argument("--prompt-file", help="text models: a file with one prompt per line")
    p.add_argument("--negative-prompt", help="text models: what to steer away from (replaces the empty prompt)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale for conditional "
                   "models (1 = none; default 3)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="guidance rescale phi (Lin et al. 2023)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="apply guidance only for sigma in (LOW, HIGH]")
    p.add_argument("--threshold", type=float, metavar="P", help="dynamic thresholding at percentile P (e.g. 0.995)")
    p.add_argument("--device")
    p.set_defaults(run=_sample)

    add_eval_parser(sub)
    add_edit_parsers(sub)
    add_stable_diffusion_parsers(sub)
    add_superres_parsers(sub)

    from .bench import samplers as bench_samplers

    p = sub.add_parser("bench", help="benchmarks against exact references and peer libraries")
    targets = p.add_subparsers(dest="target", required=True)
    b = targets.add_parser("samplers", help="samplers and sigma schedules on the Gaussian-mixture oracle, as a "
                           "discrete VP eps model (with --peers: against diffusers and k-diffusion)")
    b.add_argument("--mixture", action="append", metavar="SPEC",
                   help="2d, 64d, random:DIM:COMPONENTS:SEED or a JSON file with means/stds/weights "
                        "(repeat for several; default: 2d and 64d)")
    b.add_argument("--schedule", default="linear", choices=["linear", "scaled_linear"],
                   help="the model's 1,000-step beta schedule (default linear)")
    b.add_argument("--nfe", type=int, nargs="+", default=list(bench_samplers.NFES), help="model-evaluation budgets")
    b.add_argument("--samples", type=int, default=512, help="noise samples per mixture (default 512)")
    b.add_argument("--samplers", nargs="+", default=list(bench_samplers.DEFAULT_SAMPLERS), metavar="NAME[:k=v,...]",
                   help="diffusekit samplers, with options, e.g. unipc:order=3")
    b.add_argument("--spacings", nargs="+", default=list(bench_samplers.DEFAULT_SPACINGS), metavar="NAME[:k=v]",
                   help="sigma spacings, e.g. karras:rho=5; 'optimised' is computed from the model")
    b.add_argument("--opt-samplers", nargs="*", default=list(bench_samplers.DEFAULT_OPT_SAMPLERS),
                   metavar="NAME[:k=v,...]", help="samplers that get the optimised schedule (among --samplers)")
    b.add_argument("--calibration-samples", type=int, default=bench_samplers.CALIBRATION.num_samples,
                   help="optimised schedule: calibration noise draws (default %(default)s)")
    b.add_argument("--calibration-mining", type=int, default=bench_samplers.CALIBRATION.mining, metavar="K",
                   help="optimised schedule: half the calibration draws are the hardest of K times as many "
                        "at NFE <= 10 (0: plain draws; default %(default)s)")
    b.add_argument("--reference-steps", type=int, default=200, help="optimised schedule: reference solver steps")
    b.add_argument("--fit-nfe", type=int, nargs="*", metavar="NFE",
                   help="budgets (among --nfe) at which the fitted solver (levels and coefficients fitted to the "
                        "model) also runs; default: 5 and 10 where run; no value: none")
    b.add_argument("--peers", nargs="*", metavar="NAME",
                   help="also run diffusers' schedulers and k-diffusion's samplers (all, or only those named)")
    b.add_argument("--top", type=int, default=3, help="rows shown per family and NFE (the CSV has all)")
    b.add_argument("-o", "--out-dir", default="bench-samplers", help="folder for samplers.csv and samplers.png")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(run=_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as e:
        print(f"diffusekit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffusekit {args.command}: interrupted; the last checkpoint (if any) is intact", file=sys.stderr)
        return 130
    return 0
