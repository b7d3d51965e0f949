"""Nearest 2x upsampling + 3x3 convolution, computed as written and as the equivalent stride-2
transposed convolution with a summed 4x4 kernel (`diffusekit.nn.unet.upsample_conv3x3`'s fast
path), timed alternately (medians of 5 rounds; 3 for the VAE sizes). Training shapes time forward +
backward, the others inference.

    OMP_NUM_THREADS=2 python benchmarks/issue4_unet/upsample_conv_micro.py 2 [train|unet|vae] [--device cuda]

On a GPU (`--device cuda`, timed between synchronisations) it says whether the transposed path
would pay there too; `upsample_conv3x3` uses it only on the CPU until that is measured.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from diffusekit.nn.unet import _upsample_taps

CASES = {  # name: (batch, channels, input side, with gradients)
    "train": [("small 64@8->16 b16", 16, 64, 8, True), ("cifar 128@8->16 b16", 16, 128, 8, True),
              ("cifar 128@16->32 b16", 16, 128, 16, True), ("256@32->64 b4", 4, 256, 32, True)],
    "unet": [("320@32->64 b2", 2, 320, 32, False), ("512@16->32 b2", 2, 512, 16, False),
             ("640@16->32 b2", 2, 640, 16, False), ("sd 640@32->64 b2", 2, 640, 32, False),
             ("960@16->32 b2", 2, 960, 16, False), ("sd 1280@8->16 b2", 2, 1280, 8, False),
             ("sd 1280@16->32 b2", 2, 1280, 16, False), ("1280@32->64 b1", 1, 1280, 32, False)],
    "vae": [("vae 512@64->128 b1", 1, 512, 64, False), ("vae 512@128->256 b1", 1, 512, 128, False),
            ("vae 256@256->512 b1", 1, 256, 256, False)],
}


def as_written(x, w, b):
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)


def transposed(x, w, b):
    return F.conv_transpose2d(x, _upsample_taps(_upsample_taps(w, 2), 3).transpose(0, 1), b, stride=2, padding=1)


DEVICE = "cpu"


def synchronize():
    if DEVICE != "cpu":
        torch.cuda.synchronize()


def timed(f, x, w, b, grad, reps):
    if grad:
        x, w, b = (t.requires_grad_() for t in (x, w, b))

        def run():
            f(x, w, b).sum().backward()
    else:
        def run():
            with torch.no_grad():
                f(x, w, b)
    run()
    synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        run()
    synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def main():
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("threads", type=int, nargs="?", default=1)
    parser.add_argument("group", nargs="?", default="train", choices=list(CASES))
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = parser.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: PyTorch sees no CUDA device here")
    DEVICE = args.device
    torch.set_num_threads(args.threads)
    for name, batch, c, side, grad in CASES[args.group]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, c, side, side, generator=g).to(DEVICE)
        w, b = (torch.randn(c, c, 3, 3, generator=g) * 0.05).to(DEVICE), torch.randn(c, generator=g).to(DEVICE)
        err = (as_written(x, w, b) - transposed(x, w, b)).abs().max().item()
        reps, rounds = (10, 5) if DEVICE != "cpu" else (1, 3) if side >= 64 else ((3, 5) if c >= 640 else (10, 5))
        times = {"as written": [], "transposed": []}
        for r in range(rounds):
            order = [("as written", as_written), ("transposed", transposed)]
            for key, f in order if r % 2 == 0 else order[::-1]:
                times[key].append(timed(f, x.clone(), w.clone(), b.clone(), grad, reps))
        m = {k: statistics.median(v) for k, v in times.items()}
        print(f"{name:22s} {'train' if grad else 'infer'}: as written {m['as written']:8.2f} ms  transposed "
              f"{m['transposed']:8.2f} ms  speed-up {m['as written'] / m['transposed']:.2f}x  max diff {err:.1e}")


if __name__ == "__main__":
    main()
