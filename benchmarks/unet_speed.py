"""U-Net speed on the CPU: diffusekit's UNet against diffusers' UNet2DModel with the same
architecture and the same weights, timed alternately in one process.

    python benchmarks/unet_speed.py [--config small|cifar|all] [--threads 2,1] [--repeats 7] [--bf16]
                                    [--window 1.0] [--no-memory] [--compile] [--device cuda [--batch 256]]

For each configuration and thread count it prints images/s for a forward pass and for a training
step (forward + MSE + backward + AdamW, each library with the optimizer it trains with:
diffusekit's trainer uses PyTorch's fused AdamW kernel, diffusers' training examples the default
`torch.optim.AdamW`, a loop over the tensors on the CPU), achieved GFLOP/s (FLOPs counted by
torch.utils.flop_counter) as a fraction of this machine's measured peak (a 2048^2 sgemm and a 1x1
convolution), the tensor memory one training step allocates at its peak beyond what is held before
it (weights, optimizer state, inputs; from the profiler's allocation events) and the ratios
diffusekit / diffusers.

Method: all variants (diffusers and diffusekit, float32 and with --bf16 also bf16 autocast) live
in one process and are timed in interleaved windows (A B C D, then D C B A, ...), the machine's
peak is re-measured in every round, and the printed numbers are medians over the rounds; the
ratios are medians of the per-round ratios (each taken under the same load). Timing the libraries
in separate processes one after the other swung 2x on this shared 2-core machine.

With --device cuda the same comparison runs on a GPU: rates are taken between device
synchronisations, the peak is a large float32 (and with --bf16, bf16) matrix product, memory is
what one training step allocates at its peak beyond what is already held (weights, optimizer
state, inputs: torch.cuda.max_memory_allocated less memory_allocated before it), and the thread
count does not apply.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext

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
LIBRARIES = ("diffusers", "diffusekit")
COMPILED = "dk+compile"  # the --compile variant's row


def build(name: str, which: str, module=None):
    """The same network (same weights) as diffusers' UNet2DModel or as diffusekit's UNet.
    `module`: another implementation of diffusekit.nn.unet (for A/B comparisons of a change)."""
    import diffusers

    from diffusekit.convert import unet_state_from_diffusers

    if module is None:
        from diffusekit.nn import unet as module

    c = CONFIGS[name]
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(sample_size=c["size"], in_channels=c["channels"], out_channels=c["channels"],
                                block_out_channels=c["block_out_channels"], layers_per_block=c["layers_per_block"],
                                down_block_types=c["down"], up_block_types=c["up"], attention_head_dim=8)
    if which == "diffusers":
        return ref, lambda m, x, t: m(x, t).sample
    attn_sizes = tuple(c["size"] // 2**i for i, b in enumerate(c["down"]) if b.startswith("Attn"))
    ours = module.UNet(module.UNetConfig(in_channels=c["channels"], image_size=c["size"],
                                         block_out_channels=c["block_out_channels"], layers_per_block=c["layers_per_block"],
                                         attention_resolutions=attn_sizes, head_dim=8))
    ours.load_state_dict(unet_state_from_diffusers(ref.state_dict()), strict=True)
    return ours, lambda m, x, t: m(x, t)


class Variant:
    """One network with its inputs, optimizer and the two timed functions."""

    def __init__(self, name: str, which: str, bf16: bool = False, module=None, device: str = "cpu",
                 batch: int = BATCH, compile: bool = False):
        self.model, call = build(name, which, module)
        self.model.to(device)
        c = CONFIGS[name]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, c["channels"], c["size"], c["size"], generator=g).to(device)
        t = torch.randint(0, 1000, (batch,), generator=g).float().to(device)
        target = torch.randn_like(x)
        if which == "diffusers":
            opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        else:
            from diffusekit.train.core import adamw
            opt = adamw(self.model.parameters(), lr=1e-4)
        amp = (lambda: torch.autocast(x.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
        model = self.model  # the functions below call whatever `model` is when they run

        def forward():
            with torch.no_grad(), amp():
                call(model, x, t)

        def loss_and_backward():
            with amp():
                out = call(model, x, t)
            loss = torch.nn.functional.mse_loss(out.float(), target)
            loss.backward()

        def train_step():
            loss_and_backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        self.forward, self.train_step = forward, train_step
        from torch.utils.flop_counter import FlopCounterMode

        # FLOPs on the eager module: the counter does not see inside compiled graphs
        with FlopCounterMode(display=False) as fc:
            forward()
        self.fwd_flops = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            loss_and_backward()
        opt.zero_grad(set_to_none=True)
        self.train_flops = fc.get_total_flops()
        if compile:  # torch.compile (inductor), compiled here by one call of each kind
            from diffusekit.train.core import compile_for_training

            model = compile_for_training(self.model, device)
            started = time.perf_counter()
            forward()
            train_step()
            self.compile_seconds = time.perf_counter() - started
        self.params = sum(p.numel() for p in self.model.parameters())


DEVICE = "cpu"  # where the timed work runs (main() sets it): rates need a synchronisation on a GPU


def synchronize() -> None:
    if DEVICE != "cpu":
        torch.cuda.synchronize(DEVICE)


def machine_peak_once(device: str = "cpu", dtype=torch.float32) -> float:
    """Practical peak GFLOP/s now: the better of a large matrix product and a 1x1 convolution
    (best of 2 each; 2048^2 on the CPU, 8192^2 on a GPU)."""
    n, batch = (2048, 16) if device == "cpu" else (8192, 256)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    conv_x = torch.randn(batch, 256, 32, 32, device=device, dtype=dtype)
    conv_w = torch.randn(256, 256, 1, 1, device=device, dtype=dtype)

    def best(fn, flops):
        times = []
        for _ in range(2 if device == "cpu" else 5):
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            times.append(time.perf_counter() - start)
        return flops / min(times) / 1e9

    return max(best(lambda: a @ b, 2 * n**3),
               best(lambda: torch.nn.functional.conv2d(conv_x, conv_w), 2 * batch * 256 * 256 * 32 * 32))


def window_rate(fn, seconds: float) -> float:
    synchronize()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 2:
        fn()
        n += 1
        if n % 8 == 0:
            synchronize()
    synchronize()
    return n / (time.perf_counter() - start)


def interleaved(variants: dict, what: str, repeats: int, seconds: float, peak=None) -> dict:
    """Rates (calls/s) of `getattr(variant, what)` for every variant, timed in alternating windows.
    Returns {key: [rate per round]}; calls `peak()` once per round if given."""
    for v in variants.values():
        for _ in range(2):
            getattr(v, what)()
    rates = {k: [] for k in variants}
    keys = list(variants)
    for r in range(repeats):
        if peak is not None:
            peak()
        for k in (keys if r % 2 == 0 else keys[::-1]):
            rates[k].append(window_rate(getattr(variants[k], what), seconds))
    return rates


def paired_ratio(a: list, b: list) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def print_cross_ratios(args, fwd: dict, train: dict) -> None:
    """The ratio rows against diffusers' float32 eager step: diffusekit's bf16 (--bf16) and
    compiled (--compile) variants."""
    rows = ([(("diffusekit", "bf16"), "bf16/", "diffusekit bf16 autocast against diffusers float32")] if args.bf16 else []) \
        + ([((COMPILED, "fp32"), "comp.", "diffusekit compiled against diffusers eager")] if args.compile else [])
    for key, label, what in rows:
        print(f"{'ratio':10} {label:5} {'':>9} {paired_ratio(fwd[key], fwd['diffusers', 'fp32']):>9.2f}x "
              f"{paired_ratio(train[key], train['diffusers', 'fp32']):>11.2f}x   ({what})")


def step_peak_mb(variant: Variant) -> float:
    """The tensor memory one training step allocates at its peak beyond what is held before it,
    from the profiler's allocation events (the CPU's counterpart of CUDA's max_memory_allocated;
    max RSS compared little: both processes load both libraries and import-time state dominates)."""
    from torch.profiler import ProfilerActivity, profile

    variant.train_step()  # the optimizer state exists before the measured step
    saved_stderr = os.dup(2)  # kineto logs every profiler start and stop on stderr
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                variant.train_step()
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
    try:  # the profiler's raw events are not a public API
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
    except AttributeError as e:
        raise ValueError(f"this torch's profiler does not expose its allocation events ({e}): run with --no-memory") from None
    allocated = peak = 0
    for event in events:
        allocated += event.nbytes()
        peak = max(peak, allocated)
    return peak / 2**20


def run_cuda(args) -> None:
    """The comparison on a GPU: float32 as PyTorch runs it by default (cuDNN convolutions in TF32,
    matmuls in full float32) and with --bf16 also bf16 autocast, each library against diffusers in
    the same precision and diffusekit's bf16 against diffusers' float32."""
    device, batch = args.device, args.batch or 256
    configs = list(CONFIGS) if args.config == "all" else [args.config]
    precisions = ["fp32", "bf16"] if args.bf16 else ["fp32"]
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(device)}, batch {batch}; medians of "
          f"{args.repeats} rounds of {args.window:.1f} s windows, timed between device synchronisations")
    for name in configs:
        variants = {(lib, p): Variant(name, lib, p == "bf16", device=device, batch=batch)
                    for p in precisions for lib in LIBRARIES}
        if args.compile:
            variants[COMPILED, "fp32"] = Variant(name, "diffusekit", device=device, batch=batch, compile=True)
            print(f"{name}: torch.compile took {variants[COMPILED, 'fp32'].compile_seconds:.0f} s")
        peaks = {p: [] for p in precisions}

        def measure_peaks():
            for p in precisions:
                peaks[p].append(machine_peak_once(device, torch.bfloat16 if p == "bf16" else torch.float32))

        fwd = interleaved(variants, "forward", args.repeats, args.window)
        train = interleaved(variants, "train_step", args.repeats, args.window, measure_peaks)
        memory = {}  # this variant's step: the peak over what the other variants already hold
        for key, v in variants.items():
            synchronize()
            held = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            v.train_step()
            synchronize()
            memory[key] = (torch.cuda.max_memory_allocated(device) - held) / 2**20
        print(f"\n== {name} on {device}: measured peak " +
              ", ".join(f"{p} {statistics.median(peaks[p]) / 1e3:.0f} TFLOP/s" for p in precisions) + " ==")
        print(f"{'library':10} {'prec':5} {'params':>9} {'fwd img/s':>10} {'train img/s':>12} {'train TFLOP/s':>14} "
              f"{'% peak':>7} {'step MiB':>9}")
        for (lib, p), v in variants.items():
            f, s = statistics.median(fwd[lib, p]), statistics.median(train[lib, p])
            tf = s * v.train_flops / 1e12
            print(f"{lib:10} {p:5} {v.params:>9,} {f * batch:>10.0f} {s * batch:>12.0f} {tf:>14.2f} "
                  f"{100 * tf * 1e3 / statistics.median(peaks[p]):>6.1f}% {memory[lib, p]:>9.0f}")
        for p in precisions:
            print(f"{'ratio':10} {p:5} {'':>9} {paired_ratio(fwd['diffusekit', p], fwd['diffusers', p]):>9.2f}x "
                  f"{paired_ratio(train['diffusekit', p], train['diffusers', p]):>11.2f}x {'':>14} {'':>7} "
                  f"{memory['diffusekit', p] / memory['diffusers', p]:>8.2f}x")
        print_cross_ratios(args, fwd, train)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="all", choices=["all", *CONFIGS])
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--repeats", type=int, default=7, help="rounds of interleaved windows")
    parser.add_argument("--window", type=float, default=1.0, help="seconds per timing window")
    parser.add_argument("--bf16", action="store_true", help="also time both libraries under bf16 autocast")
    parser.add_argument("--no-memory", action="store_true", help="skip the step's peak-memory measurement")
    parser.add_argument("--compile", action="store_true", help="also time diffusekit under torch.compile "
                        "(float32, CPU; what `diffusekit train --compile` runs)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int, help="images per step on a GPU (default 256; the CPU runs batch "
                        f"{BATCH})")
    args = parser.parse_args()
    if args.compile:
        from diffusekit.train.core import check_compile_supported

        check_compile_supported(args.device)
    if args.device != "cpu":
        if not args.device.startswith("cuda"):
            raise ValueError(f"--device {args.device}: this benchmark runs on cpu or cuda[:N]")
        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: PyTorch sees no CUDA device here; leave --device out for the CPU")
        global DEVICE
        DEVICE = args.device
        run_cuda(args)
        return
    configs = list(CONFIGS) if args.config == "all" else [args.config]
    if args.bf16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # without avx512_bf16/AMX, oneDNN emulates bf16: a bf16 matmul ran 90x and a convolution 45x
        # slower than float32 on this machine's AVX2-only CPU, and one cifar step took minutes
        print("bf16 skipped: this CPU has no native bf16 (torch.ops.mkldnn._is_mkldnn_bf16_supported() is False)")
        args.bf16 = False
    precisions = ["fp32", "bf16"] if args.bf16 else ["fp32"]
    print(f"torch {torch.__version__}, batch {BATCH}; variants timed alternately in one process, "
          f"medians of {args.repeats} rounds of {args.window:.1f} s windows; ratios are medians of per-round ratios")
    for threads in [int(s) for s in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for name in configs:
            variants = {(lib, p): Variant(name, lib, p == "bf16") for p in precisions for lib in LIBRARIES}
            if args.compile:
                variants[COMPILED, "fp32"] = Variant(name, "diffusekit", compile=True)
                print(f"{name}: torch.compile took {variants[COMPILED, 'fp32'].compile_seconds:.0f} s "
                      f"({threads} thread(s); inductor caches compiled kernels on disk)")
            peaks: list[float] = []
            fwd = interleaved(variants, "forward", args.repeats, args.window)
            train = interleaved(variants, "train_step", args.repeats, args.window,
                                lambda: peaks.append(machine_peak_once()))
            peak = statistics.median(peaks)
            memory = {} if args.no_memory else {key: step_peak_mb(v) for key, v in variants.items()}
            print(f"\n== {name}, {threads} thread(s): measured peak {peak:.1f} GFLOP/s "
                  f"(median of per-round bests {min(peaks):.1f}-{max(peaks):.1f}) ==")
            print(f"{'library':10} {'prec':5} {'params':>9} {'fwd img/s':>10} {'train img/s':>12} {'train GFLOP/s':>14} "
                  f"{'% peak':>7} {'step peak MB':>13}")
            for (lib, p), v in variants.items():
                f, s = statistics.median(fwd[lib, p]), statistics.median(train[lib, p])
                gf = s * v.train_flops / 1e9
                mem = f"{memory[lib, p]:>13.1f}" if memory else f"{'-':>13}"
                print(f"{lib:10} {p:5} {v.params:>9,} {f * BATCH:>10.1f} {s * BATCH:>12.1f} {gf:>14.1f} "
                      f"{100 * gf / peak:>6.1f}% {mem}")
            for p in precisions:
                mem = f"{memory['diffusekit', p] / memory['diffusers', p]:>12.2f}x" if memory else ""
                print(f"{'ratio':10} {p:5} {'':>9} {paired_ratio(fwd['diffusekit', p], fwd['diffusers', p]):>9.2f}x "
                      f"{paired_ratio(train['diffusekit', p], train['diffusers', p]):>11.2f}x {'':>14} {'':>7} {mem}")
            print_cross_ratios(args, fwd, train)


if __name__ == "__main__":
    from diffusekit._utils import run_script

    sys.exit(run_script(main))
