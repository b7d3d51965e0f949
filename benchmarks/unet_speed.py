"""U-Net speed on the CPU: diffusekit's UNet against diffusers' UNet2DModel with the same
architecture and the same weights, measured in the same run.

    python benchmarks/unet_speed.py [--config small|cifar|all] [--threads 2,1] [--repeats 5]

For each configuration and thread count it prints images/s for a forward pass and for a training
step (forward + MSE + backward + AdamW), achieved GFLOP/s (FLOPs counted by
torch.utils.flop_counter) as a fraction of this machine's measured peak (a large sgemm and a 1x1
convolution timed in the same run), peak memory (max RSS of a fresh subprocess per variant), and
the ratio diffusekit / diffusers. Timings are medians of `--repeats` windows; the machine is shared,
so only the ratios measured side by side mean anything.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

CONFIGS = {
    # the digits regime: per-op overhead dominates
    "small": dict(size=16, channels=1, block_out_channels=(32, 64), down=("DownBlock2D", "AttnDownBlock2D"),
                  up=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=2),
    # the CIFAR regime: convolutions dominate
    "cifar": dict(size=32, channels=3, block_out_channels=(64, 128, 128),
                  down=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"), up=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                  layers_per_block=2),
}
BATCH = 16


def build(name: str, which: str):
    """The same network (same weights) as diffusers' UNet2DModel or as diffusekit's UNet."""
    import diffusers

    from diffusekit.convert import unet_state_from_diffusers
    from diffusekit.nn.unet import UNet, UNetConfig

    c = CONFIGS[name]
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(sample_size=c["size"], in_channels=c["channels"], out_channels=c["channels"],
                                block_out_channels=c["block_out_channels"], layers_per_block=c["layers_per_block"],
                                down_block_types=c["down"], up_block_types=c["up"], attention_head_dim=8)
    if which == "diffusers":
        return ref, lambda m, x, t: m(x, t).sample
    attn_sizes = tuple(c["size"] // 2**i for i, b in enumerate(c["down"]) if b.startswith("Attn"))
    ours = UNet(UNetConfig(in_channels=c["channels"], image_size=c["size"], block_out_channels=c["block_out_channels"],
                           layers_per_block=c["layers_per_block"], attention_resolutions=attn_sizes, head_dim=8))
    state = unet_state_from_diffusers(ref.state_dict())
    ours.load_state_dict(state, strict=True)
    return ours, lambda m, x, t: m(x, t)


def measure(name: str, which: str, threads: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    from torch.utils.flop_counter import FlopCounterMode

    model, call = build(name, which)
    c = CONFIGS[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, c["channels"], c["size"], c["size"], generator=g)
    t = torch.randint(0, 1000, (BATCH,), generator=g).float()
    target = torch.randn_like(x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def forward():
        with torch.no_grad():
            call(model, x, t)

    def train_step():
        loss = torch.nn.functional.mse_loss(call(model, x, t), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as fc:
        forward()
    fwd_flops = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        loss = torch.nn.functional.mse_loss(call(model, x, t), target)
        loss.backward()
    opt.zero_grad(set_to_none=True)
    train_flops = fc.get_total_flops()

    def rate(fn, min_time=1.0):
        for _ in range(3):
            fn()
        samples = []
        for _ in range(repeats):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < min_time / repeats * 2 or n < 2:
                fn()
                n += 1
            samples.append(n / (time.perf_counter() - start))
        return statistics.median(samples)

    fwd = rate(forward)
    step = rate(train_step)
    return {"params": sum(p.numel() for p in model.parameters()), "fwd_img_s": fwd * BATCH,
            "train_img_s": step * BATCH, "fwd_gflops": fwd * fwd_flops / 1e9, "train_gflops": step * train_flops / 1e9,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def machine_peak(threads: int) -> float:
    """Practical peak GFLOP/s: the better of a 2048^2 sgemm and a 1x1 convolution."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    conv_x, conv_w = torch.randn(16, 256, 32, 32), torch.randn(256, 256, 1, 1)

    def best(fn, flops):
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return flops / min(times) / 1e9

    return max(best(lambda: a @ b, 2 * 2048**3), best(lambda: torch.nn.functional.conv2d(conv_x, conv_w), 2 * 16 * 256 * 256 * 32 * 32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="all", choices=["all", *CONFIGS])
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one measurement in a fresh process, so max RSS is this variant's own
        name, which, threads = args.worker
        print(json.dumps(measure(name, which, int(threads), args.repeats)))
        return
    configs = list(CONFIGS) if args.config == "all" else [args.config]
    print(f"torch {torch.__version__}, batch {BATCH}, float32; medians of {args.repeats} windows")
    for threads in [int(s) for s in args.threads.split(",")]:
        peak = machine_peak(threads)
        print(f"\n== {threads} thread(s): measured peak {peak:.1f} GFLOP/s ==")
        print(f"{'config':7} {'library':10} {'params':>9} {'fwd img/s':>10} {'train img/s':>12} {'train GFLOP/s':>14} "
              f"{'% peak':>7} {'max RSS MB':>11}")
        for name in configs:
            results = {}
            for which in ("diffusers", "diffusekit"):
                out = subprocess.run([sys.executable, __file__, "--worker", name, which, str(threads),
                                      "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
                r = results[which] = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{name:7} {which:10} {r['params']:>9,} {r['fwd_img_s']:>10.1f} {r['train_img_s']:>12.1f} "
                      f"{r['train_gflops']:>14.1f} {100 * r['train_gflops'] / peak:>6.1f}% {r['max_rss_mb']:>11.0f}")
            ours, ref = results["diffusekit"], results["diffusers"]
            print(f"{name:7} {'ratio':10} {'':>9} {ours['fwd_img_s'] / ref['fwd_img_s']:>9.2f}x "
                  f"{ours['train_img_s'] / ref['train_img_s']:>11.2f}x {'':>14} {'':>7} "
                  f"{ours['max_rss_mb'] / ref['max_rss_mb']:>10.2f}x")


if __name__ == "__main__":
    main()
