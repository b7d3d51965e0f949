"""cifar's 16x16 self-attention (batch 16, 16 heads of 8 channels, 256 tokens), forward + backward:
PyTorch's SDPA (its CPU flash kernel; what both libraries run), the plain matmul-softmax-matmul
path, and a custom autograd function that runs the math path in chunks of CHUNK batch*head rows
and recomputes the scores in the backward (so each chunk's 256x256 scores stay in cache).
Timed alternately, 7 rounds; all agree to 3e-7.

    OMP_NUM_THREADS=2 python benchmarks/issue4_unet/attention_256_tokens_micro.py 2
"""
import sys, time, torch, statistics
import torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]))
B, H, N, d = 16, 16, 256, 8

class Chunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, chunk):
        out = torch.empty_like(q)
        for i in range(0, q.shape[0], chunk):
            s = torch.bmm(q[i:i+chunk], k[i:i+chunk].transpose(1, 2))
            torch.bmm(s.softmax(-1), v[i:i+chunk], out=out[i:i+chunk])
        ctx.save_for_backward(q, k, v)
        ctx.chunk = chunk
        return out
    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        chunk = ctx.chunk
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dout = dout.contiguous()
        for i in range(0, q.shape[0], chunk):
            sl = slice(i, i + chunk)
            p = torch.bmm(q[sl], k[sl].transpose(1, 2)).softmax(-1)
            torch.bmm(p.transpose(1, 2), dout[sl], out=dv[sl])
            dp = torch.bmm(dout[sl], v[sl].transpose(1, 2))
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
            torch.bmm(ds, k[sl], out=dq[sl])
            torch.bmm(ds.transpose(1, 2), q[sl], out=dk[sl])
        return dq, dk, dv, None

def run_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.view(B, H, N, d), k.view(B, H, N, d), v.view(B, H, N, d), scale=1.0).view(B*H, N, d)
def run_math(q, k, v):
    return torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(-1), v)
def mk(chunk):
    return lambda q, k, v: Chunked.apply(q, k, v, chunk)

g = torch.Generator().manual_seed(0)
q0, k0, v0 = (torch.randn(B*H, N, d, generator=g) * 0.35 for _ in range(3))
do = torch.randn(B*H, N, d, generator=g)
variants = {"sdpa": run_sdpa, "math": run_math, "chunk4": mk(4), "chunk16": mk(16), "chunk64": mk(64)}
ref = None
for name, f in variants.items():
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    o = f(q, k, v); o.backward(do)
    r = (o.detach(), q.grad, k.grad, v.grad)
    if ref is None: ref = r
    else: assert max((a - b).abs().max().item() for a, b in zip(r, ref)) < 1e-5, name
times = {n: [] for n in variants}
for rep in range(7):
    for name in (list(variants) if rep % 2 == 0 else list(variants)[::-1]):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        t0 = time.perf_counter()
        for _ in range(3):
            o = variants[name](q, k, v); o.backward(do)
        times[name].append((time.perf_counter() - t0) / 3 * 1e3)
print("fwd+bwd", "  ".join(f"{n} {statistics.median(t):.1f} ms" for n, t in times.items()))
