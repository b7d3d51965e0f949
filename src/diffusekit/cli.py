"""The `diffusekit` command."""

from __future__ import annotations

import argparse
import sys

import torch

from .schedules import SCHEDULE_NAMES, BETA_SCHEDULES, NoiseSchedule


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
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as e:
        print(f"diffusekit {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
