"""The digits-regime self-attention block (64 channels, 8x8 = 64 tokens, 8 heads of 8, batch 16) in
four layouts that compute the same function, timed alternately: forward + backward, and forward
alone under no_grad.

    OMP_NUM_THREADS=2 python benchmarks/issue4_unet/attention_layouts_micro.py 2

current:    scores q^T k [BH, Nq, Nk], softmax over the last dim, out = v @ p^T (diffusekit's `_small`)
p_vT:       the same scores, out = p @ v^T then a [BH, N, d] transpose (the softmax gradient is contiguous)
keys_major: scores k^T q [BH, Nk, Nq], softmax over dim 1, out = v @ p (no transposes, contiguous gradient)
sdpa:       token-major q/k/v through F.scaled_dot_product_attention (what diffusers runs)
"""
import statistics
import sys
import time

import torch

from diffusekit.nn import unet as U


def qkv_heads(attn, x):
    b, c, n = x.shape
    heads = attn.heads
    d = c // heads
    scale = d**-0.5
    weight = torch.stack([attn.to_q.weight * scale, attn.to_k.weight, attn.to_v.weight])
    weight = weight.view(3, heads, d, c).transpose(0, 1).reshape(3 * c, c)
    bias = torch.stack([attn.to_q.bias * scale, attn.to_k.bias, attn.to_v.bias]).view(3, heads, d).transpose(0, 1)
    qkv = torch.baddbmm(bias.reshape(1, 3 * c, 1), weight.expand(b, -1, -1), x)
    return qkv.view(b * heads, 3, d, n).unbind(1)


def project(attn, out):
    proj = attn.to_out[0]
    return torch.baddbmm(proj.bias[None, :, None], proj.weight.expand(out.shape[0], -1, -1), out)


def p_vT(self, x):
    b, c, n = x.shape
    q, k, v = qkv_heads(self.attention, x)
    p = torch.bmm(q.transpose(1, 2), k).softmax(-1)
    out = torch.bmm(p, v.transpose(1, 2))
    heads = self.attention.heads
    return project(self.attention, out.view(b, heads, n, c // heads).transpose(2, 3).reshape(b, c, n))


def keys_major(self, x):
    b, c, n = x.shape
    q, k, v = qkv_heads(self.attention, x)
    p = torch.bmm(k.transpose(1, 2), q).softmax(1)
    return project(self.attention, torch.bmm(v, p).view(b, c, n))


def sdpa(self, x):
    return self.attention(x.transpose(1, 2)).transpose(1, 2)


def main():
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    cfg = U.UNetConfig(in_channels=1, image_size=16, block_out_channels=(32, 64), layers_per_block=2,
                       attention_resolutions=(8,), head_dim=8)
    block = U.SelfAttentionBlock(64, 8, cfg)
    x = torch.randn(16, 64, 8, 8, requires_grad=True)
    variants = {"current": U.SelfAttentionBlock._small, "p_vT": p_vT, "keys_major": keys_major, "sdpa": sdpa}
    reference = None
    for name, fn in variants.items():  # the same function, to float rounding
        U.SelfAttentionBlock._small = fn
        x.grad = None
        y = block(x)
        y.square().sum().backward()
        if reference is None:
            reference = y.detach(), x.grad.clone()
        assert torch.allclose(y, reference[0], atol=1e-5) and torch.allclose(x.grad, reference[1], atol=1e-4), name
    for what in ("forward+backward", "forward (no_grad)"):
        times = {k: [] for k in variants}
        for r in range(9):
            for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                U.SelfAttentionBlock._small = variants[name]
                start = time.perf_counter()
                for _ in range(30):
                    if what == "forward+backward":
                        block(x).sum().backward()
                    else:
                        with torch.no_grad():
                            block(x)
                times[name].append((time.perf_counter() - start) / 30 * 1e3)
        print(what, "  ".join(f"{k} {statistics.median(v):.2f} ms" for k, v in times.items()))


if __name__ == "__main__":
    main()
