"""One configurable U-Net: from a 1M-parameter digits model to the Stable Diffusion 1.x/2.x layout.

    x ─ conv_in ─ down levels (ResBlocks [+ attention], downsample) ─ mid (Res, attention, Res)
                ─ up levels (ResBlocks on [h, skip] [+ attention], upsample) ─ norm, SiLU, conv_out

The time step enters every ResBlock through a sinusoidal embedding and an MLP (added, or as a
scale and shift of the second GroupNorm). Attention is either a plain self-attention block
(DDPM) or a transformer block with self-attention, cross-attention to `context` and a GEGLU
feed-forward (Stable Diffusion). Submodule names follow the layout of the published checkpoints
(`down_blocks.0.resnets.1.conv1`, ...) so that real weights map in by renaming little.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .._utils import dataclass_from_dict


@dataclass
class UNetConfig:
    in_channels: int = 1
    out_channels: int | None = None  # default: in_channels
    image_size: int = 8  # input side; sets the resolution pyramid that attention_resolutions refers to
    patch_size: int = 1  # >1: the network runs on p x p pixel patches stacked as channels (p^2 fewer positions)
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 2
    attention_resolutions: tuple[int, ...] = (4,)  # sides at which down/up levels get attention
    mid_attention: bool = True
    attention_type: str = "self"  # "self" (DDPM block) or "transformer" (SD block, cross-attention if context_dim)
    num_heads: int | tuple[int, ...] | None = None  # heads per level (SD 1.x: 8) ...
    head_dim: int | None = 32  # ... or channels per head (SD 2.x: 64); exactly one of the two
    transformer_depth: int = 1
    context_dim: int | None = None  # text hidden size for cross-attention
    pooled_context_dim: int | None = None  # a pooled text vector added to the time embedding (as SDXL does)
    use_linear_projection: bool = False  # SD 2.x projects in/out of transformers with Linear, 1.x with 1x1 conv
    num_classes: int | None = None  # class embedding (index num_classes = "no class", for guidance)
    concat_channels: int = 0  # extra input channels (super-resolution, inpainting masks)
    augmentation_embedding: bool = False  # embed `aug_level`, the noise level of a noised conditioning image (SR3/Imagen)
    dropout: float = 0.0
    norm_groups: int = 32
    norm_eps: float = 1e-5
    time_scale_shift: bool = False  # ADM's scale-shift norm instead of adding the time embedding
    resample: str = "conv"  # "conv" (strided conv / nearest + conv) or "resblock" (BigGAN-style up/down ResBlocks)
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    gradient_checkpointing: bool = False

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.attention_resolutions = tuple(self.attention_resolutions)
        if isinstance(self.num_heads, list):
            self.num_heads = tuple(self.num_heads)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        self.validate()

    def validate(self) -> None:
        def fail(name, why):
            raise ValueError(f"UNetConfig.{name}: {why}")

        if not self.block_out_channels or min(self.block_out_channels) < 1:
            fail("block_out_channels", "needs at least one positive channel count")
        for c in self.block_out_channels:
            if c % self.norm_groups:
                fail("block_out_channels", f"{c} is not divisible by norm_groups={self.norm_groups}")
        levels = len(self.block_out_channels)
        if self.patch_size < 1 or self.image_size % self.patch_size:
            fail("patch_size", f"{self.patch_size} does not divide image_size={self.image_size}")
        if self.image_size % self.downsampling_factor:
            fail("image_size", f"{self.image_size} (patch {self.patch_size}) cannot be halved {levels - 1} times")
        pyramid = self.pyramid()
        for r in self.attention_resolutions:
            if r not in pyramid:
                fail("attention_resolutions", f"{r} is not in the resolution pyramid {pyramid}")
        if self.attention_type not in ("self", "transformer"):
            fail("attention_type", f"{self.attention_type!r} is not 'self' or 'transformer'")
        if self.context_dim is not None and self.attention_type != "transformer":
            fail("context_dim", "cross-attention needs attention_type='transformer'")
        if self.pooled_context_dim is not None and self.pooled_context_dim < 1:
            fail("pooled_context_dim", "must be >= 1")
        if (self.num_heads is None) == (self.head_dim is None):
            fail("num_heads", "set exactly one of num_heads and head_dim")
        for i, c in enumerate(self.block_out_channels):
            if self.head_dim is not None and c % self.head_dim:
                fail("head_dim", f"{c} channels are not divisible by head_dim={self.head_dim}")
            if self.num_heads is not None and c % self.heads_at(i):
                fail("num_heads", f"{c} channels are not divisible by {self.heads_at(i)} heads")
        if self.augmentation_embedding and not self.concat_channels:
            fail("augmentation_embedding", "embeds the noise level of a concat image: set concat_channels too")
        if self.resample not in ("conv", "resblock"):
            fail("resample", f"{self.resample!r} is not 'conv' or 'resblock'")
        if self.layers_per_block < 1:
            fail("layers_per_block", "must be >= 1")
        if not 0 <= self.dropout < 1:
            fail("dropout", "must lie in [0, 1)")

    @property
    def downsampling_factor(self) -> int:
        """Input side / lowest level's side: image sides must be multiples of it."""
        return self.patch_size * 2 ** (len(self.block_out_channels) - 1)

    def pyramid(self) -> list[int]:
        """The side of the feature maps at each level (what attention_resolutions refers to)."""
        return [self.image_size // self.patch_size // 2**i for i in range(len(self.block_out_channels))]

    def heads_at(self, level: int) -> int:
        if self.num_heads is None:
            return self.block_out_channels[level] // self.head_dim
        return self.num_heads[level] if isinstance(self.num_heads, tuple) else self.num_heads

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        return dataclass_from_dict(cls, d, "U-Net")


PRESETS: dict[str, dict] = {
    # ~1M parameters: 8x8 digits (any even side works with image_size set; attention at half size)
    "digits": dict(block_out_channels=(32, 64), layers_per_block=2, attention_resolutions=(4,), head_dim=32),
    # ~1.1M parameters for 28x28 MNIST: 2x2 patches (pyramid 14-7) cut the FLOPs 4x against full resolution.
    # Scale-shift time conditioning: with 32 channels in 32 groups, an added time embedding is a
    # per-channel constant that GroupNorm removes, so the first level's ResBlocks never saw the time
    # step; at 300 equal steps (2 seeds) this gave FD 117 vs 172 and 77% vs 66% rated a digit
    # (benchmarks/RESULTS.md, "Digits and MNIST: time conditioning through GroupNorm")
    "mnist": dict(in_channels=1, image_size=28, patch_size=2, block_out_channels=(32, 64), layers_per_block=2,
                  attention_resolutions=(7,), head_dim=32, time_scale_shift=True),
    # ~1.2M parameters (2.1M with cross-attention to MiniLM) for 32x32 RGB shapes on a CPU: 2x2
    # patches make the pyramid 16-8-4 (a third of the FLOPs of a full-resolution first level);
    # attention (cross-attention for text) at 8 and 4. 64 channels at the 4x4 level, not 128: ~1.2x
    # the steps per minute (4.3 against 3.55 on two threads), and prompt binding in a 20-minute CPU
    # run depends on steps (it sets in at ~3,500-4,000; RESULTS.md, issue 6).
    # Scale-shift conditioning for the same reason as mnist: the pooled prompt rides on the time
    # embedding, which GroupNorm erased at the 32-channel level (colour adherence 15% -> 34% after
    # ~240 equal steps)
    "shapes": dict(in_channels=3, image_size=32, patch_size=2, block_out_channels=(32, 64, 64), layers_per_block=1,
                   attention_resolutions=(8, 4), head_dim=32, time_scale_shift=True),
    # the DDPM CIFAR-10 network (Ho et al. 2020): ~35.7M parameters
    "cifar32": dict(in_channels=3, image_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                    attention_resolutions=(16,), head_dim=None, num_heads=1, dropout=0.1),
    # Stable Diffusion 1.5 (64x64x4 latents, CLIP ViT-L/14 context)
    "sd15": dict(in_channels=4, image_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 attention_resolutions=(64, 32, 16), attention_type="transformer", head_dim=None, num_heads=8,
                 context_dim=768, norm_eps=1e-5),
    # Stable Diffusion 2.x (head dim 64, linear projections, OpenCLIP ViT-H context)
    "sd2": dict(in_channels=4, image_size=96, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                attention_resolutions=(96, 48, 24), attention_type="transformer", head_dim=64,
                context_dim=1024, use_linear_projection=True),
}


def preset(name: str, **overrides) -> UNetConfig:
    """A preset's config with overrides. A new image_size moves attention to the same levels of the
    pyramid (e.g. cifar32 at 64x64 attends at 32x32) unless attention_resolutions is given too."""
    if name not in PRESETS:
        raise ValueError(f"unknown U-Net preset {name!r}; valid: {', '.join(PRESETS)}")
    base = {**PRESETS[name]}
    old_size = base.get("image_size", UNetConfig.image_size)
    new_size = overrides.get("image_size", old_size)
    if new_size != old_size and "attention_resolutions" not in overrides:
        levels = [old_size // r for r in base.get("attention_resolutions", UNetConfig.attention_resolutions)]
        base["attention_resolutions"] = tuple(new_size // f for f in levels if new_size % f == 0)
    return UNetConfig(**{**base, **overrides})


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0) -> Tensor:
    """Sinusoidal features of (fractional) timesteps: frequencies 10000^(-i / (half - shift))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift))
    args = t.float()[:, None] * freqs
    emb = torch.cat([args.cos(), args.sin()] if flip_sin_to_cos else [args.sin(), args.cos()], -1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(dim, out), nn.Linear(out, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def conv3x3(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """`conv(x)` for the ResBlock and resampler convolutions, as one matrix product (im2col) when
    that is faster: at inference on the CPU, where there are few positions for the channel count
    (the 16x16 to 4x4 levels of Stable Diffusion at 256-512 px). oneDNN's direct convolution
    spends most of its time there re-laying out the large weight (1280 x 2560 x 3 x 3 is 118 MB)
    on every call, at 10-30 GFLOP/s against 40-60 for a GEMM on the weight as it is stored. Same
    function; training, GPUs and small networks (under 512 channels, where it does not pay) keep
    the library convolution."""
    b, _, h, w = x.shape
    cout = conv.out_channels
    if cout < 512 or 2 * b * h * w > cout or torch.is_grad_enabled() or x.device.type != "cpu":
        return conv(x)
    (sh, sw), (ph, pw) = conv.stride, conv.padding
    ho, wo = (h + 2 * ph - 3) // sh + 1, (w + 2 * pw - 3) // sw + 1
    cols = F.unfold(x, 3, padding=conv.padding, stride=conv.stride)  # [B, C*9, Ho*Wo]
    cols = cols.transpose(0, 1).reshape(cols.shape[1], b * ho * wo)  # [C*9, B*Ho*Wo]
    weight = conv.weight.reshape(cout, -1)
    out = torch.mm(weight, cols) if conv.bias is None else torch.addmm(conv.bias[:, None], weight, cols)
    return out.reshape(cout, b, ho, wo).transpose(0, 1).contiguous()


def conv1x1(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """`conv(x)` for a 1x1 convolution (the ResBlock shortcut) as a batched matrix product
    W[Cout, Cin] @ x[b, Cin, H*W] on the CPU for small maps (<= 16x16) and outputs (<= 64 channels,
    the digits regime): there oneDNN's 1x1 convolution re-lays out its operands on every call and
    its backward ran at ~5 GFLOP/s; the bmm (with the weight broadcast over the batch) took
    0.6-0.75x the time forward + backward (batch 16, 32-128 -> 32-64 channels). Larger layers (the
    cifar config's 16x16 shortcuts measured slower) keep the library convolution. Same function."""
    b, c, h, w = x.shape
    if x.device.type != "cpu" or conv.out_channels > 64 or h * w > 256:
        return conv(x)
    weight = conv.weight.reshape(conv.out_channels, c).expand(b, -1, -1)
    if conv.bias is None:
        out = torch.bmm(weight, x.reshape(b, c, h * w))
    else:
        out = torch.baddbmm(conv.bias[None, :, None], weight, x.reshape(b, c, h * w))
    return out.view(b, conv.out_channels, h, w)


def _upsample_taps(weight: Tensor, dim: int) -> Tensor:
    """Along `dim`, the 3 taps (a, b, c) of a kernel applied after 2x nearest upsampling, as the 4
    taps of a stride-2 transposed kernel: (c, b + c, a + b, a). An even output pixel sees input
    pixels (i - 1, i) with taps (a, b + c), an odd one (i, i + 1) with (a + b, c)."""
    a, b, c = weight.unbind(dim)
    return torch.stack([c, b + c, a + b, a], dim)


def upsample_conv3x3(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """`conv(F.interpolate(x, scale_factor=2, mode="nearest"))` as one stride-2 transposed
    convolution with a 4x4 kernel summed from conv's 3x3 one. Each output pixel depends on 2x2
    input pixels, so this takes 16 multiply-adds per channel pair and input pixel instead of 36
    (2.25x fewer), and never builds the upsampled map. Same function (to float rounding); it is
    differentiable in the kernel, so training is unchanged. On the CPU (two threads) it took
    0.4-0.6x the time forward + backward (64-256 channels) and 0.55-0.9x at inference (320-1280
    channels, the Stable Diffusion U-Net's and VAE decoder's upsamplers) wherever the input has at
    least half as many positions (batch x H x W) as channels; with fewer (1280 channels at 8x8-16x16,
    batch 2) oneDNN's transposed convolution was slower (0.4-1.0x), so those, and GPUs (not
    measured), keep the upsample and the 3x3 convolution (benchmarks/RESULTS.md, issue 4)."""
    b, _, h, w = x.shape
    if x.device.type != "cpu" or 2 * b * h * w < max(conv.in_channels, conv.out_channels):
        return conv3x3(conv, F.interpolate(x, scale_factor=2.0, mode="nearest"))
    weight = _upsample_taps(_upsample_taps(conv.weight, 2), 3).transpose(0, 1)  # [Cin, Cout, 4, 4]
    return F.conv_transpose2d(x, weight, conv.bias, stride=2, padding=1)


class Resample(nn.Module):
    """Halve (strided 3x3 conv) or double (nearest + 3x3 conv) the resolution."""

    def __init__(self, channels: int, up: bool):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1)

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        return upsample_conv3x3(self.conv, x) if self.up else conv3x3(self.conv, x)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, time embedding added after the first (or scale/shift of the
    second norm), optional resolution change inside the block (BigGAN / ADM)."""

    def __init__(self, cin: int, cout: int, temb_dim: int, cfg: UNetConfig, resample: str | None = None):
        super().__init__()
        self.scale_shift = cfg.time_scale_shift
        self.resample = resample
        self.norm1 = nn.GroupNorm(cfg.norm_groups, cin, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout * (2 if self.scale_shift else 1))
        self.norm2 = nn.GroupNorm(cfg.norm_groups, cout, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """`temb`: SiLU of the time embedding (the U-Net applies it once for all blocks)."""
        h = F.silu(self.norm1(x))
        h = upsample_conv3x3(self.conv1, h) if self.resample == "up" else conv3x3(self.conv1, self._resample(h))
        x = self._resample(x)
        t = self.time_emb_proj(temb)[:, :, None, None].to(h.dtype)
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + t)
        h = conv3x3(self.conv2, self.dropout(F.silu(h)))
        return (x if self.conv_shortcut is None else conv1x1(self.conv_shortcut, x)) + h


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections (k/v from `context` when given)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False):
        super().__init__()
        self.heads = heads
        kv_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(kv_dim, dim, bias=bias)
        self.to_v = nn.Linear(kv_dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (z.reshape(b, -1, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        if mask is not None:  # [B, L] True = attend
            mask = mask[:, None, None, :].to(torch.bool)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, d))


class SelfAttentionBlock(nn.Module):
    """DDPM's attention block: GroupNorm, multi-head self-attention over pixels, residual."""

    def __init__(self, channels: int, heads: int, cfg: UNetConfig):
        super().__init__()
        self.group_norm = nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps)
        self.attention = Attention(channels, heads, bias=True)

    def forward(self, x: Tensor, context=None, context_mask=None) -> Tensor:
        b, c, h, w = x.shape
        if h * w > self.max_math_tokens or x.device.type != "cpu":
            tokens = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)
            return x + self.attention(tokens).transpose(1, 2).reshape(b, c, h, w)
        return x + self._small(self.group_norm(x).reshape(b, c, h * w)).view(b, c, h, w)

    # Up to this many pixels, on the CPU, attention runs as plain batched matrix products in the
    # channel-major layout the convolutions use: no token transposes, q/k/v in one product, and no
    # CPU flash-attention kernel, whose backward costs ~10 ms at 64 tokens x 8 heads of 8 channels
    # (the digits regime). At 256 tokens x 16 heads (cifar-sized) the materialised n x n scores made
    # the training step slower than SDPA, hence the limit.
    max_math_tokens = 64

    def _small(self, x: Tensor) -> Tensor:
        """Multi-head self-attention of x [B, C, N] -> [B, C, N], the same function as `attention`."""
        attn = self.attention
        b, c, n = x.shape
        heads = attn.heads
        d = c // heads
        scale = d**-0.5
        # rows ordered (head, q/k/v, channel) so each head's q, k and v are one [3d, N] slab;
        # the softmax scale folds into the q rows
        weight = torch.stack([attn.to_q.weight * scale, attn.to_k.weight, attn.to_v.weight])  # [3, C, C]
        weight = weight.view(3, heads, d, c).transpose(0, 1).reshape(3 * c, c)
        bias = torch.stack([attn.to_q.bias * scale, attn.to_k.bias, attn.to_v.bias]).view(3, heads, d).transpose(0, 1)
        qkv = torch.baddbmm(bias.reshape(1, 3 * c, 1), weight.expand(b, -1, -1), x)  # [B, heads*3*d, N]
        out = _ChannelMajorAttention.apply(qkv.view(b * heads, 3, d, n)).view(b, c, n)  # channel = head * d + i
        proj = attn.to_out[0]
        return torch.baddbmm(proj.bias[None, :, None], proj.weight.expand(b, -1, -1), out)


class _ChannelMajorAttention(torch.autograd.Function):
    """softmax(q^T k) applied to v, for q/k/v stacked as [B*heads, 3, d, N] (scale folded into q),
    returning [B*heads, d, N]. Autograd's own backward of the two products hands the softmax a
    transposed gradient (its backward then ran ~8x slower than on a contiguous one) and computes
    grad q as [N, d] matrices (~1.6x slower than [d, N] at d = 8); this backward orients every
    product so its output is a row-major [d, N] or [N, N] matrix, and returns the three gradients
    as one stacked tensor instead of three zero-filled copies. It also holds less memory (see
    forward), at no cost to the training step on two threads and 3% of it on one."""

    @staticmethod
    def forward(ctx, qkv: Tensor) -> Tensor:
        q, k, v = qkv.unbind(1)
        scores = torch.bmm(q.transpose(1, 2), k)  # [B*heads, N queries, N keys]
        p = scores.softmax(-1)
        # Keep the rows' log-normaliser, not p: backward recomputes p from it, so a step holds no
        # N x N tensor per attention layer (more than diffusers' flash attention holds). p is
        # largest where the scores are, so log-normaliser = max score - log(max p), no extra exp.
        if ctx.needs_input_grad[0]:
            log_norm = scores.amax(-1, keepdim=True) - p.amax(-1, keepdim=True).log()
            ctx.save_for_backward(qkv, log_norm)
        return torch.bmm(v, p.transpose(1, 2))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> Tensor:
        qkv, log_norm = ctx.saved_tensors
        q, k, v = qkv.unbind(1)
        p = torch.bmm(q.transpose(1, 2), k).sub_(log_norm).exp_()
        grad_v = torch.bmm(grad_out, p)
        grad_scores = torch.bmm(grad_out.transpose(1, 2), v)  # grad of p, then in place of the scores
        torch.ops.aten._softmax_backward_data.out(grad_scores, p, -1, p.dtype, grad_input=grad_scores)
        grad_q = torch.bmm(k, grad_scores.transpose(1, 2))
        grad_k = torch.bmm(q, grad_scores)
        return torch.stack([grad_q, grad_k, grad_v], 1)


class GEGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden * 2)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention (to context, or self when there is none), GEGLU MLP."""

    def __init__(self, dim: int, heads: int, context_dim: int | None):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)
        self.cross = context_dim is not None

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        if self.cross:
            if context is None:
                raise ValueError("this U-Net has cross-attention: pass context=[B, L, context_dim]")
            x = x + self.attn2(self.norm2(x), context, context_mask)
        else:
            x = x + self.attn2(self.norm2(x))
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Stable Diffusion's Transformer2DModel: GroupNorm, project in, transformer blocks over the
    pixels as tokens, project out, residual."""

    def __init__(self, channels: int, heads: int, cfg: UNetConfig):
        super().__init__()
        self.linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6)
        proj = (lambda: nn.Linear(channels, channels)) if self.linear else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, cfg.context_dim) for _ in range(cfg.transformer_depth)]
        )
        self.proj_out = proj()

    def forward(self, x: Tensor, context=None, context_mask=None) -> Tensor:
        b, c, h, w = x.shape
        hidden = self.norm(x)
        if self.linear:
            hidden = self.proj_in(hidden.reshape(b, c, h * w).transpose(1, 2))
        else:
            hidden = self.proj_in(hidden).reshape(b, c, h * w).transpose(1, 2)
        for block in self.transformer_blocks:
            hidden = block(hidden, context, context_mask)
        if self.linear:
            hidden = self.proj_out(hidden).transpose(1, 2).reshape(b, c, h, w)
        else:
            hidden = self.proj_out(hidden.transpose(1, 2).reshape(b, c, h, w))
        return x + hidden


def _attention(channels: int, level: int, cfg: UNetConfig) -> nn.Module:
    heads = cfg.heads_at(level)
    if cfg.attention_type == "transformer":
        return SpatialTransformer(channels, heads, cfg)
    return SelfAttentionBlock(channels, heads, cfg)


class Level(nn.Module):
    """One resolution of the down or up path: ResBlocks, optional attention after each, and an
    optional resampler at the end."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module] | None, resampler: nn.Module | None, up: bool):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        name = "upsamplers" if up else "downsamplers"
        setattr(self, name, nn.ModuleList([resampler]) if resampler is not None else None)
        self.up = up

    @property
    def resampler(self):
        r = self.upsamplers if self.up else self.downsamplers
        return r[0] if r is not None else None


class MidBlock(nn.Module):
    def __init__(self, channels: int, temb_dim: int, cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(channels, channels, temb_dim, cfg), ResBlock(channels, channels, temb_dim, cfg)])
        self.attentions = nn.ModuleList([_attention(channels, len(cfg.block_out_channels) - 1, cfg)]) if cfg.mid_attention else None


# ---------------------------------------------------------------------------------------------
# The U-Net
# ---------------------------------------------------------------------------------------------


class UNet(nn.Module):
    """`unet(x, t, class_labels=None, context=None, context_mask=None, concat=None, context_pooled=None,
    aug_level=None)` -> a tensor of x's shape (out_channels). `t` is the per-sample noise
    conditioning (a fractional timestep for discrete models, log(sigma) / 4 for continuous ones);
    `aug_level` the noise level of a noised `concat` image, on the same scale as `t`."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch = cfg.block_out_channels
        temb_dim = ch[0] * 4
        pyramid = cfg.pyramid()
        patch_area = cfg.patch_size**2
        self.time_embedding = TimestepEmbedding(ch[0], temb_dim)
        self.class_embedding = nn.Embedding(cfg.num_classes + 1, temb_dim) if cfg.num_classes else None
        # the whole prompt in every ResBlock from the first step on; cross-attention adds where and which
        self.add_embedding = TimestepEmbedding(cfg.pooled_context_dim, temb_dim) if cfg.pooled_context_dim else None
        # noise-conditioning augmentation: how noisy the concatenated low-resolution image is
        self.aug_embedding = TimestepEmbedding(ch[0], temb_dim) if cfg.augmentation_embedding else None
        self.conv_in = nn.Conv2d((cfg.in_channels + cfg.concat_channels) * patch_area, ch[0], 3, padding=1)

        def resampler(c: int, up: bool) -> nn.Module:
            if cfg.resample == "resblock":
                return ResBlock(c, c, temb_dim, cfg, resample="up" if up else "down")
            return Resample(c, up)

        self.down_blocks = nn.ModuleList()
        skip_channels = [ch[0]]
        cin = ch[0]
        for level, cout in enumerate(ch):
            attn = pyramid[level] in cfg.attention_resolutions
            last = level == len(ch) - 1
            resnets, attentions = [], []
            for _ in range(cfg.layers_per_block):
                resnets.append(ResBlock(cin, cout, temb_dim, cfg))
                if attn:
                    attentions.append(_attention(cout, level, cfg))
                cin = cout
                skip_channels.append(cout)
            self.down_blocks.append(Level(resnets, attentions, None if last else resampler(cout, up=False), up=False))
            if not last:
                skip_channels.append(cout)

        self.mid_block = MidBlock(ch[-1], temb_dim, cfg)

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(ch))):
            cout = ch[level]
            attn = pyramid[level] in cfg.attention_resolutions
            resnets, attentions = [], []
            for _ in range(cfg.layers_per_block + 1):
                resnets.append(ResBlock(cin + skip_channels.pop(), cout, temb_dim, cfg))
                if attn:
                    attentions.append(_attention(cout, level, cfg))
                cin = cout
            self.up_blocks.append(Level(resnets, attentions, resampler(cout, up=True) if level else None, up=True))

        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels * patch_area, 3, padding=1)

    def _run(self, module: nn.Module, *args):
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, concat: Tensor | None = None,
                context_pooled: Tensor | None = None, aug_level: Tensor | None = None) -> Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected x of shape [B, {cfg.in_channels}, H, W], got {tuple(x.shape)}")
        multiple = cfg.downsampling_factor
        if x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(f"H and W must be divisible by {multiple}, got {tuple(x.shape[-2:])}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.time_embedding(timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift))
        if self.class_embedding is not None:
            if class_labels is None:  # unconditional: the extra "no class" row
                class_labels = torch.full((x.shape[0],), cfg.num_classes, device=x.device, dtype=torch.long)
            temb = temb + self.class_embedding(class_labels)
        elif class_labels is not None:
            raise ValueError("this U-Net has no class embedding (num_classes is not set); drop class_labels")
        if self.add_embedding is not None:
            if context_pooled is None or context_pooled.shape != (x.shape[0], cfg.pooled_context_dim):
                got = None if context_pooled is None else tuple(context_pooled.shape)
                raise ValueError(f"this U-Net needs context_pooled=[B, {cfg.pooled_context_dim}], got {got}")
            # normalised first: sentence encoders give unit-norm vectors (elements ~ 1/sqrt(D)), far
            # below the scale the embedding MLP learns quickly from
            pooled = F.layer_norm(context_pooled.to(temb.dtype), (cfg.pooled_context_dim,))
            temb = temb + self.add_embedding(pooled)
        elif context_pooled is not None:
            raise ValueError("this U-Net takes no pooled text vector (pooled_context_dim is not set)")
        if self.aug_embedding is not None:
            if aug_level is None:
                raise ValueError("this U-Net embeds the conditioning image's noise level: pass aug_level=[B] "
                                 "(0 for a clean image)")
            aug_level = torch.as_tensor(aug_level, device=x.device, dtype=torch.float32).expand(x.shape[0])
            temb = temb + self.aug_embedding(timestep_embedding(aug_level, cfg.block_out_channels[0],
                                                                cfg.flip_sin_to_cos, cfg.freq_shift))
        elif aug_level is not None:
            raise ValueError("this U-Net has no augmentation-level embedding (augmentation_embedding is False)")
        if cfg.concat_channels:
            if concat is None or concat.shape[1] != cfg.concat_channels or concat.shape[-2:] != x.shape[-2:]:
                got = None if concat is None else tuple(concat.shape)
                raise ValueError(f"this U-Net needs concat=[B, {cfg.concat_channels}, {x.shape[-2]}, {x.shape[-1]}], got {got}")
            x = torch.cat([x, concat.to(x.dtype)], 1)
        elif concat is not None:
            raise ValueError("this U-Net takes no concat channels (concat_channels is 0)")
        temb = F.silu(temb).to(x.dtype)  # once here: every ResBlock projects SiLU(temb)
        if cfg.patch_size > 1:
            x = F.pixel_unshuffle(x, cfg.patch_size)

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            for i, resnet in enumerate(block.resnets):
                h = self._run(resnet, h, temb)
                if block.attentions is not None:
                    h = self._run(block.attentions[i], h, context, context_mask)
                skips.append(h)
            if block.resampler is not None:
                h = self._run(block.resampler, h, temb)
                skips.append(h)

        mid = self.mid_block
        h = self._run(mid.resnets[0], h, temb)
        if mid.attentions is not None:
            h = self._run(mid.attentions[0], h, context, context_mask)
        h = self._run(mid.resnets[1], h, temb)

        for block in self.up_blocks:
            for i, resnet in enumerate(block.resnets):
                h = self._run(resnet, torch.cat([h, skips.pop()], 1), temb)
                if block.attentions is not None:
                    h = self._run(block.attentions[i], h, context, context_mask)
            if block.resampler is not None:
                h = self._run(block.resampler, h, temb)

        out = self.conv_out(F.silu(self.conv_norm_out(h)))
        return F.pixel_shuffle(out, cfg.patch_size) if cfg.patch_size > 1 else out
