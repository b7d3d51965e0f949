import re

import pytest
import torch
import torch.nn.functional as F

from diffusekit.convert.autoencoder import (
    autoencoder_config_from_diffusers,
    autoencoder_state_from_diffusers,
    autoencoder_state_from_ldm,
)
from diffusekit.nn.autoencoder import (
    AutoencoderConfig,
    AutoencoderKL,
    DiagonalGaussian,
    blend_tiles,
    preset,
)

SD_DIFFUSERS_CONFIG = dict(  # Stable Diffusion 1.x/2.x vae/config.json
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2,
    norm_num_groups=32, act_fn="silu", sample_size=512, scaling_factor=0.18215,
)
SMALL_DIFFUSERS_CONFIG = dict(
    block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=32,
)


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _assert_close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.fixture(scope="module")
def reference_pair():
    """A random diffusers AutoencoderKL (norm affines randomised too) and ours with its weights."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**SMALL_DIFFUSERS_CONFIG).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    ours = AutoencoderKL(autoencoder_config_from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(autoencoder_state_from_diffusers(ref.state_dict()))  # strict: every key maps
    return ref, ours


@torch.no_grad()
def test_matches_diffusers_autoencoder_kl(reference_pair):
    ref, ours = reference_pair
    x = torch.randn(2, 3, 32, 24)  # non-square on purpose
    post_ref, post = ref.encode(x).latent_dist, ours.encode(x)
    _assert_close(post.mean, post_ref.mean)
    _assert_close(post.logvar, post_ref.logvar)
    _assert_close(post.std, post_ref.std)
    z = torch.randn(2, 4, 16, 12)
    _assert_close(ours.decode(z), ref.decode(z).sample)
    recon, _ = ours(x, sample=False)
    _assert_close(recon, ref(x, sample_posterior=False).sample)
    # sampling draws the same noise from the same generator
    recon, _ = ours(x, sample=True, generator=torch.Generator().manual_seed(3))
    _assert_close(recon, ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample)
    _assert_close(post.kl(), post_ref.kl())
    _assert_close(post.nll(z), post_ref.nll(z))


def test_sd_preset_has_the_published_size():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ours = AutoencoderKL(preset("sd"))
        ref = diffusers.AutoencoderKL(**SD_DIFFUSERS_CONFIG)
    assert _count(ours) == _count(ref) == 83_653_863
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in autoencoder_state_from_diffusers(ref.state_dict()).items()
    }
    assert autoencoder_config_from_diffusers(SD_DIFFUSERS_CONFIG) == preset("sd")
    assert preset("sd").downsampling_factor == 8


def test_small_preset_shapes():
    cfg = preset("small")
    assert cfg.downsampling_factor == 4
    vae = AutoencoderKL(cfg)
    assert 0.5e6 < _count(vae) < 1.5e6
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, post = vae(x, generator=torch.Generator().manual_seed(0))
    assert post.mean.shape == (2, 4, 8, 8) and recon.shape == x.shape
    recon.abs().mean().add(post.kl().mean()).backward()  # trainable end to end
    assert vae.encoder.conv_in.weight.grad is not None


def test_legacy_diffusers_attention_names_and_conv_weights(reference_pair):
    """Pre-0.14 diffusers checkpoints name the attention query/key/value/proj_attn; some store 1x1 convs."""
    ref, ours = reference_pair
    legacy = {}
    for key, value in ref.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                value = value[:, :, None, None] if value.ndim == 2 else value
        legacy[key] = value
    assert any(".proj_attn.weight" in k for k in legacy)
    converted = autoencoder_state_from_diffusers(legacy)
    expected = ref.state_dict()
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)


def _to_ldm(state: dict, levels: int) -> dict:
    """diffusers VAE keys -> the CompVis layout (inside an SD checkpoint), attention as 1x1 convs."""
    out = {}
    for key, value in state.items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", k)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
        k = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{levels - 1 - int(m.group(1))}.block.", k)
        k = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m.group(1))}.upsample.", k)
        k = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", k)
        for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            if f"mid_block.attentions.0.{new}." in k:
                k = k.replace(f"mid_block.attentions.0.{new}.", f"mid.attn_1.{old}.")
                value = value[:, :, None, None] if value.ndim == 2 else value
        out["first_stage_model." + k] = value
    return out


def test_single_file_ldm_keys_match_diffusers_converter(reference_pair):
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ref, _ = reference_pair
    expected = ref.state_dict()
    ldm = _to_ldm(expected, levels=2)
    ldm["model.diffusion_model.conv_in.weight"] = torch.zeros(1)  # the rest of an SD checkpoint is left out
    ldm["first_stage_model.loss.logvar"] = torch.zeros(())
    # our synthetic CompVis state is what diffusers' own single-file converter understands ...
    theirs = convert_ldm_vae_checkpoint(ldm, dict(ref.config))
    assert theirs.keys() == expected.keys() and all(torch.equal(theirs[k], expected[k]) for k in expected)
    # ... and ours maps it to the same tensors
    converted = autoencoder_state_from_ldm(ldm)
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)


def test_gaussian_kl_and_nll_against_closed_form():
    torch.manual_seed(0)
    moments = torch.randn(3, 8, 4, 5)
    post = DiagonalGaussian(moments)
    mean, logvar = moments[:, :4], moments[:, 4:]
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    _assert_close(post.kl(), torch.distributions.kl_divergence(q, p).sum((1, 2, 3)))
    other = DiagonalGaussian(torch.randn(3, 8, 4, 5))
    q_other = torch.distributions.Normal(other.mean, other.std)
    _assert_close(post.kl(other), torch.distributions.kl_divergence(q, q_other).sum((1, 2, 3)))
    z = torch.randn(3, 4, 4, 5)
    _assert_close(post.nll(z), -q.log_prob(z).sum((1, 2, 3)))
    assert torch.equal(post.mode(), mean)
    # the log-variance is clamped to [-30, 20], so extreme encoder outputs stay finite
    extreme = torch.cat([torch.full((1, 2, 2, 2), 1e3), torch.full((1, 2, 2, 2), -1e3)], 1)
    wild = DiagonalGaussian(torch.cat([torch.zeros(1, 4, 2, 2), extreme], 1))
    assert wild.logvar.max() == 20 and wild.logvar.min() == -30
    assert torch.isfinite(wild.kl()).all() and torch.isfinite(wild.sample()).all()


def test_sample_draws_only_from_the_generator():
    post = DiagonalGaussian(torch.randn(2, 8, 3, 3))
    state = torch.get_rng_state()
    a = post.sample(torch.Generator().manual_seed(7))
    b = post.sample(torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert torch.equal(a, b)
    assert not torch.equal(a, post.sample(torch.Generator().manual_seed(8)))
    # one generator per sample: sample i does not depend on the batch it is in
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    both = post.sample(gens())
    alone = DiagonalGaussian(post.moments[1:]).sample(gens()[1:])
    assert torch.equal(both[1:], alone)
    with pytest.raises(ValueError, match="one per sample"):
        post.sample(gens()[:1])


def test_blend_tiles_is_exact_for_a_pointwise_decoder():
    """The blending weights sum to one everywhere: a decoder without spatial context is reproduced."""
    z = torch.randn(1, 4, 13, 10)
    fn = lambda t: F.interpolate(t, scale_factor=4, mode="nearest")[:, :3] * 2 + 1  # noqa: E731
    full = fn(z)
    for tile, overlap in ((4, 2), (5, 1), (6, 0), (8, 3), (13, 4)):
        _assert_close(blend_tiles(fn, z, tile, overlap, 4), full, tol=1e-6)


@torch.no_grad()
def test_tiled_decode(reference_pair):
    _, vae = reference_pair
    torch.manual_seed(1)
    z = torch.randn(1, 4, 24, 24)
    full = vae.decode(z)
    # a tile that covers the latent is the plain decode, bit for bit
    assert torch.equal(vae.decode(z, tile=24), full)
    assert torch.equal(vae.decode_tiled(z, tile_latent=32, overlap=8), full)
    # smaller tiles see their own GroupNorm statistics and attention, so a random network (the worst
    # case: nothing local about it) is only roughly reproduced; more overlap brings it closer
    err = lambda t, o: ((vae.decode_tiled(z, t, o) - full).norm() / full.norm()).item()  # noqa: E731
    assert err(16, 8) < 0.2
    assert err(12, 8) < err(12, 4) < err(12, 0)
    assert vae.decode(z, tile=16, overlap=8).shape == full.shape
    with pytest.raises(ValueError, match="overlap"):
        vae.decode_tiled(z, tile_latent=8, overlap=8)


def test_encode_latents_applies_the_scaling():
    vae = AutoencoderKL(preset("small", scaling_factor=0.5, shift_factor=0.25)).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        latents = vae.encode_latents(x, sample=False)
        _assert_close(latents, (vae.encode(x).mean - 0.25) * 0.5)
        _assert_close(vae.decode_latents(latents), vae.decode(vae.encode(x).mean))


@pytest.mark.parametrize(
    "field,kwargs",
    [
        ("block_out_channels", dict(block_out_channels=(32, 48), norm_groups=32)),
        ("block_out_channels", dict(block_out_channels=())),
        ("latent_channels", dict(latent_channels=0)),
        ("layers_per_block", dict(layers_per_block=0)),
        ("norm_eps", dict(norm_eps=0.0)),
        ("scaling_factor", dict(scaling_factor=0.0)),
        ("in_channels", dict(in_channels=-1)),
    ],
)
def test_config_errors_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=rf"AutoencoderConfig\.{field}:"):
        AutoencoderConfig(**kwargs)


def test_config_round_trip_and_unknown_fields():
    cfg = preset("small", latent_channels=8)
    assert AutoencoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown autoencoder config fields: heads"):
        AutoencoderConfig.from_dict({**cfg.to_dict(), "heads": 2})
    with pytest.raises(ValueError, match="unknown autoencoder preset"):
        preset("sd9")
    with pytest.raises(ValueError, match="down_block_types"):
        autoencoder_config_from_diffusers({**SD_DIFFUSERS_CONFIG, "down_block_types": ["AttnDownEncoderBlock2D"] * 4})


def test_bad_inputs_raise_one_line_errors():
    vae = AutoencoderKL(preset("small"))
    cases = [
        (lambda: vae.encode(torch.randn(1, 1, 16, 16)), r"encode expects images of shape \[B, 3, H, W\]"),
        (lambda: vae.encode(torch.randn(3, 16, 16)), r"\[B, 3, H, W\]"),
        (lambda: vae.encode(torch.randn(1, 3, 18, 16)), "divisible by 4.*pad or crop"),
        (lambda: vae.encode(torch.full((1, 3, 16, 16), float("nan"))), "NaN"),
        (lambda: vae.decode(torch.randn(1, 3, 16, 16)), "latents of shape.*encode them first"),
        (lambda: vae.decode(torch.randn(1, 4, 4, 4).log()), "NaN"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            call()
        assert "\n" not in str(info.value)
