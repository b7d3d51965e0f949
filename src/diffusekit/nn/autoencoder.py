"""A KL-regularised convolutional autoencoder: the architecture of Stable Diffusion's VAE.

    x ─ conv_in ─ down levels (ResBlocks, stride-2 conv) ─ mid (Res, attention, Res) ─ norm, SiLU, conv_out
      ─ quant_conv ─ [mean, logvar] ─ DiagonalGaussian ─ z
    z ─ post_quant_conv ─ conv_in ─ mid (Res, attention, Res) ─ up levels (ResBlocks, nearest x2 + conv)
      ─ norm, SiLU, conv_out ─ x_hat

The image shrinks by 2 at every level but the last (factor 8 for SD's four levels). The encoder
predicts a diagonal Gaussian over latents; training adds a small KL to N(0, I) so the latent space
stays smooth, and latent diffusion runs on `(z - shift_factor) * scaling_factor`, which has about unit
variance. Submodule names follow diffusers' `AutoencoderKL` (`encoder.down_blocks.0.resnets.1.conv1`,
`mid_block.attentions.0.to_q`, ...) so its state dicts load unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import dataclass_from_dict
from .unet import upsample_conv3x3


@dataclass
class AutoencoderConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # one level each; all but the last halve H, W
    layers_per_block: int = 2  # ResBlocks per encoder level (the decoder has one more, as SD's does)
    norm_groups: int = 32
    norm_eps: float = 1e-6
    mid_attention: bool = True  # the single-head self-attention between the two mid ResBlocks
    use_quant_conv: bool = True  # 1x1 convs around the latent (SD 1.x/2.x/XL have them; SD3 and FLUX do not)
    scaling_factor: float = 0.18215  # latent diffusion works on (z - shift_factor) * scaling_factor
    shift_factor: float = 0.0

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.validate()

    def validate(self) -> None:
        def fail(name, why):
            raise ValueError(f"AutoencoderConfig.{name}: {why}")

        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_groups"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(name, f"must be a positive integer, got {getattr(self, name)!r}")
        if not self.block_out_channels or min(self.block_out_channels) < 1:
            fail("block_out_channels", "needs at least one positive channel count")
        for c in self.block_out_channels:
            if c % self.norm_groups:
                fail("block_out_channels", f"{c} is not divisible by norm_groups={self.norm_groups}")
        if not self.norm_eps > 0:
            fail("norm_eps", f"must be > 0, got {self.norm_eps}")
        if not (math.isfinite(self.scaling_factor) and self.scaling_factor > 0):
            fail("scaling_factor", f"must be a finite positive number, got {self.scaling_factor}")
        if not math.isfinite(self.shift_factor):
            fail("shift_factor", f"must be finite, got {self.shift_factor}")

    @property
    def downsampling_factor(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.block_out_channels) - 1)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderConfig":
        return dataclass_from_dict(cls, d, "autoencoder")


PRESETS: dict[str, dict] = {
    # Stable Diffusion 1.x/2.x's VAE (8x downsampling, 4 latent channels): 83,653,863 parameters
    "sd": dict(),
    # SDXL's VAE: the same network, retrained, with latents of a different scale
    "sdxl": dict(scaling_factor=0.13025),
    # ~0.95M parameters for 32-64 px images on a CPU: 4x downsampling (32x32x3 -> 8x8x4). scaling_factor is a
    # placeholder: after training set it to 1 / std of the latents, as SD did
    "small": dict(block_out_channels=(32, 64, 64), layers_per_block=1, scaling_factor=1.0),
}


def preset(name: str, **overrides) -> AutoencoderConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown autoencoder preset {name!r}; valid: {', '.join(PRESETS)}")
    return AutoencoderConfig(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------------
# The latent distribution
# ---------------------------------------------------------------------------------------------


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) over latents, from the encoder's 2 * latent_channels outputs.

    logvar is clamped to [-30, 20] as in SD: an untrained or diverging encoder then cannot produce
    std = 0 or inf, which would make sample() and kl() NaN."""

    def __init__(self, moments: Tensor):
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """mean + std * eps, eps drawn only from `generator`; a list gives one generator per sample,
        so sample i does not depend on the batch it was encoded in."""
        # drawn on the generator's device (CPU generators for a CUDA model too), then moved
        shape, dtype = self.mean.shape, self.mean.dtype

        def draw(size, g):
            return torch.randn(size, generator=g, dtype=dtype, device=g.device if g is not None else self.mean.device)

        if isinstance(generator, (list, tuple)):
            if len(generator) != shape[0]:
                raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample")
            eps = torch.cat([draw((1, *shape[1:]), g) for g in generator])
        else:
            eps = draw(shape, generator)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> Tensor:
        """KL(self || other), other = N(0, I) by default, summed over all latent dims: [B]."""
        dims = tuple(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dims)
        return 0.5 * ((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                      - self.logvar + other.logvar).sum(dims)

    def nll(self, sample: Tensor, dims: tuple[int, ...] | None = None) -> Tensor:
        """-log N(sample; mean, var), summed over `dims` (all but the batch by default)."""
        dims = tuple(range(1, self.mean.ndim)) if dims is None else dims
        return 0.5 * (math.log(2 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var).sum(dims)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual (1x1 conv when the channel count changes).
    No time embedding: the autoencoder is not conditioned on anything."""

    def __init__(self, cin: int, cout: int, cfg: AutoencoderConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_groups, cin, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(cfg.norm_groups, cout, eps=cfg.norm_eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class AttentionBlock(nn.Module):
    """GroupNorm, single-head self-attention over all pixels, residual. It is the one place where
    the VAE sees the whole image at once (and why tiled decoding is only approximate)."""

    def __init__(self, channels: int, cfg: AutoencoderConfig):
        super().__init__()
        self.group_norm = nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)  # [B, HW, C]
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # one head
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return x + self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row/column on the right and bottom only. That is
    SD's choice (from taming-transformers): with padding=1 on all sides the kernel would sit one
    pixel up-left and the published weights would not fit."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (no checkerboard artefacts, unlike a learnt transposed
    conv), computed as the equivalent transposed conv where that is faster (`upsample_conv3x3`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return upsample_conv3x3(self.conv, x)


class MidBlock(nn.Module):
    def __init__(self, channels: int, cfg: AutoencoderConfig):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(channels, channels, cfg), ResBlock(channels, channels, cfg)])
        self.attentions = nn.ModuleList([AttentionBlock(channels, cfg)]) if cfg.mid_attention else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownLevel(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: AutoencoderConfig, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(cout if i else cin, cout, cfg) for i in range(cfg.layers_per_block)])
        self.downsamplers = nn.ModuleList([Downsample(cout)]) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpLevel(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: AutoencoderConfig, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(cout if i else cin, cout, cfg) for i in range(cfg.layers_per_block + 1)])
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    """Image -> 2 * latent_channels moments (mean and log-variance) at 1 / downsampling_factor size."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [DownLevel(ch[max(i - 1, 0)], c, cfg, downsample=i < len(ch) - 1) for i, c in enumerate(ch)]
        )
        self.mid_block = MidBlock(ch[-1], cfg)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch[-1], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """Latents -> image: the encoder's mirror, widest level first."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch = cfg.block_out_channels[::-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], cfg)
        self.up_blocks = nn.ModuleList(
            [UpLevel(ch[max(i - 1, 0)], c, cfg, upsample=i < len(ch) - 1) for i, c in enumerate(ch)]
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch[-1], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


# ---------------------------------------------------------------------------------------------
# The autoencoder
# ---------------------------------------------------------------------------------------------


def _check_finite(t: Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contain NaN or inf values; check the data (for latents: the sampler) first")


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets covering [0, n) with at least `overlap` shared; the last tile is aligned to the
    end so every tile has full size (small edge tiles would get skewed GroupNorm statistics)."""
    if n <= tile:
        return [0]
    return list(range(0, n - tile, tile - overlap)) + [n - tile]


def _tile_weights(starts: list[int], tile: int, n: int, scale: int, like: Tensor) -> list[Tensor]:
    """Per-pixel blending weights along one axis for each tile: a linear ramp across each region
    shared with a neighbour (rising in one tile where it falls in the other, so the two sum to 1),
    1 elsewhere. Weights stay > 0, so the normalised sum is defined everywhere."""
    out = []
    for i, a in enumerate(starts):
        size = (min(a + tile, n) - a) * scale
        w = torch.ones(size, dtype=like.dtype, device=like.device)
        for shared, rising in ((starts[i - 1] + tile - a if i else 0, True),
                               (a + tile - starts[i + 1] if i + 1 < len(starts) else 0, False)):
            if shared > 0:
                m = shared * scale
                ramp = (torch.arange(m, dtype=like.dtype, device=like.device) + 0.5) / m
                if rising:
                    w[:m] = torch.minimum(w[:m], ramp)
                else:
                    w[size - m:] = torch.minimum(w[size - m:], ramp.flip(0))
        out.append(w)
    return out


class AutoencoderKL(nn.Module):
    """`encode(x) -> DiagonalGaussian`, `decode(z) -> x`, `forward(x) -> (x_hat, posterior)`.

    Images are [B, in_channels, H, W] (SD: in [-1, 1]) with H and W divisible by
    `config.downsampling_factor`; latents are [B, latent_channels, H / f, W / f], unscaled (multiply by
    `config.scaling_factor` for the diffusion model, or use `encode_latents` / `decode_latents`)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = cfg = config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        lat = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * lat, 2 * lat, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lat, lat, 1) if cfg.use_quant_conv else None

    def encode(self, x: Tensor) -> DiagonalGaussian:
        cfg, f = self.config, self.config.downsampling_factor
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"encode expects images of shape [B, {cfg.in_channels}, H, W], got {tuple(x.shape)}")
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"encode needs H and W divisible by {f} (the downsampling factor), got "
                             f"{x.shape[-2]}x{x.shape[-1]}; pad or crop the images")
        _check_finite(x, "the images")
        moments = self.encoder(x)
        return DiagonalGaussian(moments if self.quant_conv is None else self.quant_conv(moments))

    def decode(self, z: Tensor, tile: int | None = None, overlap: int | None = None) -> Tensor:
        """Latents -> images. With `tile` (in latent pixels; overlap defaults to a quarter of it) the
        latents are decoded in overlapping tiles (see decode_tiled)."""
        if tile is not None:
            return self.decode_tiled(z, tile, tile // 4 if overlap is None else overlap)
        self._check_latents(z)
        return self._decode(z)

    def decode_tiled(self, z: Tensor, tile_latent: int = 32, overlap: int = 8) -> Tensor:
        """Decode large latents in overlapping tile_latent x tile_latent tiles, cross-faded linearly
        where they overlap: memory grows with the tile, not the image. GroupNorm statistics and the
        mid attention see one tile instead of the whole latent, so the result is close to decode(z),
        not equal to it (more overlap, larger tiles: closer); one tile covering everything is decode(z)."""
        if tile_latent < 1 or not 0 <= overlap < tile_latent:
            raise ValueError(f"decode_tiled needs tile_latent >= 1 and 0 <= overlap < tile_latent, got "
                             f"tile_latent={tile_latent}, overlap={overlap}")
        self._check_latents(z)
        return blend_tiles(self._decode, z, tile_latent, overlap, self.config.downsampling_factor)

    def forward(self, x: Tensor, sample: bool = True,
                generator: torch.Generator | list[torch.Generator] | None = None) -> tuple[Tensor, DiagonalGaussian]:
        """(reconstruction, posterior); the reconstruction decodes a posterior sample (or its mean)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self._decode(z), posterior

    def _decode(self, z: Tensor) -> Tensor:
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))

    def _check_latents(self, z: Tensor) -> None:
        c = self.config.latent_channels
        if z.ndim != 4 or z.shape[1] != c:
            looks_like_images = z.ndim == 4 and z.shape[1] == self.config.in_channels
            hint = "; these look like images: encode them first" if looks_like_images else ""
            raise ValueError(f"decode expects latents of shape [B, {c}, h, w], got {tuple(z.shape)}{hint}")
        _check_finite(z, "the latents")

    # -- latent diffusion's view of the latents --------------------------------------------------

    def encode_latents(self, x: Tensor, generator: torch.Generator | list[torch.Generator] | None = None,
                       sample: bool = True) -> Tensor:
        """Images -> latents scaled for the diffusion model: (z - shift_factor) * scaling_factor."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def decode_latents(self, z: Tensor, tile: int | None = None) -> Tensor:
        """The inverse of encode_latents' scaling, then decode."""
        return self.decode(z / self.config.scaling_factor + self.config.shift_factor, tile=tile)


def blend_tiles(fn, z: Tensor, tile: int, overlap: int, scale: int) -> Tensor:
    """fn applied to overlapping tile x tile windows of z (fn maps a [B, C, t, t] window to
    [B, C', t * scale, t * scale]) and cross-faded linearly where the windows overlap."""
    h, w = z.shape[-2:]
    ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    out = weight = wys = wxs = None
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            piece = fn(z[:, :, y:y + tile, x:x + tile])
            if out is None:
                out = piece.new_zeros(*piece.shape[:2], h * scale, w * scale)
                weight = piece.new_zeros(h * scale, w * scale)
                wys, wxs = _tile_weights(ys, tile, h, scale, piece), _tile_weights(xs, tile, w, scale, piece)
            wt = wys[i][:, None] * wxs[j][None, :]
            rows, cols = slice(y * scale, y * scale + wt.shape[0]), slice(x * scale, x * scale + wt.shape[1])
            out[:, :, rows, cols] += piece * wt
            weight[rows, cols] += wt
    return out / weight
