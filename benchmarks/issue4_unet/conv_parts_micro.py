"""How close oneDNN's 3x3 convolutions of the small config come to the machine's peak, per part.

    OMP_NUM_THREADS=1 python benchmarks/issue4_unet/conv_parts_micro.py [THREADS]

For each (batch, in, out, size) of the small U-Net's 3x3 convolutions: the forward, the input
gradient, the weight (+ bias) gradient and both gradients together, in ms and GFLOP/s (2 x MACs of
one forward per part), medians of 7 windows. Also the weight gradient as unfold + bmm, the one
alternative formulation that could beat a library convolution here. If the parts already run at
the machine's measured peak (unet_speed.py prints it), no re-formulation of the convolutions can
speed up the training step: only the time outside them is left.
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [(16, 1, 32, 16), (16, 32, 32, 16), (16, 64, 32, 16), (16, 96, 32, 16), (16, 32, 64, 8),
          (16, 64, 64, 8), (16, 128, 64, 8)]


def median_ms(fn, windows: int = 7, calls: int = 5) -> float:
    times = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    backward = torch.ops.aten.convolution_backward
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); ms (GFLOP/s)")
    for b, cin, cout, s in SHAPES:
        x, w, bias = torch.randn(b, cin, s, s), torch.randn(cout, cin, 3, 3), torch.randn(cout)
        g = torch.randn(b, cout, s, s)
        flops = 2 * b * s * s * cin * cout * 9

        def grads(mask):
            return lambda: backward(g, x, w, [cout], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)

        def weight_grad_as_bmm():
            cols = F.unfold(x, 3, padding=1)  # [B, Cin*9, H*W]
            return torch.bmm(g.reshape(b, cout, s * s), cols.transpose(1, 2)).sum(0), g.sum((0, 2, 3))

        parts = {"forward": lambda: F.conv2d(x, w, bias, padding=1), "grad input": grads((True, False, False)),
                 "grad weight": grads((False, True, True)), "both grads": grads((True, True, True)),
                 "grad weight as unfold+bmm": weight_grad_as_bmm}
        cells = [f"{name} {ms:.3f} ({flops / ms / 1e6:.0f})" for name, ms in
                 ((name, median_ms(fn)) for name, fn in parts.items())]
        print((b, cin, cout, s), " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
