import pytest
import torch

from diffusekit.convert import unet_state_from_diffusers
from diffusekit.nn.unet import PRESETS, UNet, UNetConfig, preset

diffusers = pytest.importorskip("diffusers")


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_presets_have_the_published_sizes():
    with torch.device("meta"):
        assert _count(UNet(preset("cifar32"))) == pytest.approx(35.7e6, rel=0.002)  # DDPM CIFAR-10
        assert _count(UNet(preset("sd15"))) == 859_520_964  # Stable Diffusion 1.5's U-Net
    assert 0.8e6 < _count(UNet(preset("digits"))) < 1.3e6


def test_forward_shapes_and_conditioning():
    cfg = UNetConfig(in_channels=3, image_size=16, block_out_channels=(32, 64), attention_type="transformer",
                     head_dim=16, context_dim=24, num_classes=5, concat_channels=2, attention_resolutions=(8,),
                     time_scale_shift=True, resample="resblock")
    net = UNet(cfg)
    x = torch.randn(2, 3, 16, 16)
    ctx, mask = torch.randn(2, 7, 24), torch.tensor([[1] * 7, [1] * 3 + [0] * 4], dtype=torch.bool)
    out = net(x, torch.tensor([3.0, 500.5]), class_labels=torch.tensor([1, 4]), context=ctx, context_mask=mask,
              concat=torch.randn(2, 2, 16, 16))
    assert out.shape == x.shape
    # class labels change the output; no label is the extra "no class" embedding
    base = net(x, torch.tensor([3.0, 500.5]), context=ctx, concat=torch.zeros(2, 2, 16, 16))
    other = net(x, torch.tensor([3.0, 500.5]), class_labels=torch.tensor([0, 0]), context=ctx, concat=torch.zeros(2, 2, 16, 16))
    assert not torch.allclose(base, other)
    with pytest.raises(ValueError, match="concat"):
        net(x, torch.zeros(2), context=ctx)
    with pytest.raises(ValueError, match="context"):
        net(x, torch.zeros(2), concat=torch.zeros(2, 2, 16, 16))


def test_context_mask_hides_padding_tokens():
    cfg = UNetConfig(in_channels=1, image_size=8, block_out_channels=(32, 32), attention_type="transformer",
                     head_dim=16, context_dim=8, attention_resolutions=(8, 4))
    net = UNet(cfg).eval()
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([10.0])
    ctx = torch.randn(1, 5, 8)
    mask = torch.tensor([[True, True, True, False, False]])
    changed = ctx.clone()
    changed[0, 3:] = torch.randn(2, 8) * 10
    assert torch.allclose(net(x, t, context=ctx, context_mask=mask), net(x, t, context=changed, context_mask=mask), atol=1e-6)
    assert not torch.allclose(net(x, t, context=ctx), net(x, t, context=changed), atol=1e-3)


@pytest.mark.parametrize(
    "field,kwargs",
    [
        ("attention_resolutions", dict(image_size=16, attention_resolutions=(5,))),
        ("block_out_channels", dict(block_out_channels=(30, 64))),
        ("image_size", dict(image_size=6, block_out_channels=(32, 32, 32))),
        ("head_dim", dict(head_dim=24)),
        ("num_heads", dict(head_dim=None, num_heads=None)),
        ("attention_type", dict(attention_type="linear")),
        ("context_dim", dict(context_dim=16)),
        ("resample", dict(resample="pixelshuffle")),
        ("dropout", dict(dropout=1.5)),
        ("patch_size", dict(image_size=8, patch_size=3)),
    ],
)
def test_bad_configs_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=f"UNetConfig.{field}"):
        UNetConfig(**kwargs)


def test_unknown_preset_and_fields():
    with pytest.raises(ValueError, match=", ".join(PRESETS)):
        preset("huge")
    with pytest.raises(ValueError, match="unknown U-Net config fields: bogus"):
        UNetConfig.from_dict({"bogus": 1})
    assert UNetConfig.from_dict(preset("sd15").to_dict()) == preset("sd15")


def test_patch_size_is_a_pixel_unshuffle_around_the_same_network():
    torch.manual_seed(0)
    patched = UNet(UNetConfig(in_channels=3, image_size=16, patch_size=2, block_out_channels=(32, 64),
                              attention_resolutions=(4,), concat_channels=1))
    plain = UNet(UNetConfig(in_channels=12, out_channels=12, image_size=8, block_out_channels=(32, 64),
                            attention_resolutions=(4,), concat_channels=4))
    plain.load_state_dict(patched.state_dict())  # the same weights: only the reshaping differs
    assert patched.config.pyramid() == [8, 4]
    x, concat, t = torch.randn(2, 3, 16, 16), torch.randn(2, 1, 16, 16), torch.tensor([3.0, 700.0])
    with torch.no_grad():
        patched.conv_out.weight.normal_()
        plain.conv_out.weight.copy_(patched.conv_out.weight)
        out = patched(x, t, concat=concat)
        unshuffle = torch.nn.functional.pixel_unshuffle
        ref = torch.nn.functional.pixel_shuffle(plain(unshuffle(x, 2), t, concat=unshuffle(concat, 2)), 2)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="divisible by 4"):
        patched(torch.zeros(1, 3, 6, 6), torch.zeros(1), concat=torch.zeros(1, 1, 6, 6))


def test_pooled_text_vector_enters_through_the_time_embedding():
    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=1, image_size=8, block_out_channels=(32, 64), attention_resolutions=(4,),
                          attention_type="transformer", context_dim=6, pooled_context_dim=5))
    with torch.no_grad():
        net.conv_out.weight.normal_()
    x, t, ctx = torch.randn(2, 1, 8, 8), torch.tensor([5.0, 500.0]), torch.randn(2, 3, 6)
    p = torch.randn(2, 5)
    a = net(x, t, context=ctx, context_pooled=p)
    b = net(x, t, context=ctx, context_pooled=torch.randn(2, 5))
    assert (a - b).abs().max() > 1e-4
    # layer-normalised on the way in: only the direction and spread of the vector matter
    torch.testing.assert_close(net(x, t, context=ctx, context_pooled=3 * p + 1), a, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="context_pooled"):
        net(x, t, context=ctx)
    with pytest.raises(ValueError, match="no pooled"):
        UNet(preset("digits"))(x, t, context_pooled=torch.zeros(2, 5))


def test_bad_inputs():
    net = UNet(preset("digits"))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        net(torch.zeros(2, 3, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="divisible"):
        net(torch.zeros(2, 1, 7, 7), torch.zeros(2))
    with pytest.raises(ValueError, match="class"):
        net(torch.zeros(2, 1, 8, 8), torch.zeros(2), class_labels=torch.zeros(2, dtype=torch.long))


def test_same_function_as_diffusers_unet2d_condition_model():
    """The Stable Diffusion layout: diffusers' UNet2DConditionModel weights load into ours by name
    and give the same output (tiny sizes, same structure as SD 1.x)."""
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8,
    ).eval()
    ours = UNet(UNetConfig(in_channels=4, image_size=16, block_out_channels=(32, 64), layers_per_block=2,
                           attention_resolutions=(16,), attention_type="transformer", head_dim=None, num_heads=4,
                           context_dim=24, norm_groups=8)).eval()
    assert unet_state_from_diffusers(ref.state_dict()).keys() == ref.state_dict().keys()  # SD layout: same names
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 24)
    with torch.no_grad():
        assert torch.allclose(ours(x, t, context=ctx), ref(x, t, encoder_hidden_states=ctx).sample, atol=1e-5)


def test_same_function_as_diffusers_unet2d_model():
    """The DDPM layout: diffusers' UNet2DModel (self-attention blocks) maps in with one renaming."""
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=8,
    ).eval()
    ours = UNet(UNetConfig(in_channels=1, image_size=16, block_out_channels=(32, 64), layers_per_block=2,
                           attention_resolutions=(8,), head_dim=8, norm_groups=8)).eval()
    state = unet_state_from_diffusers(ref.state_dict())
    ours.load_state_dict(state, strict=True)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0.0, 10.0, 999.0])
    with torch.no_grad():
        assert torch.allclose(ours(x, t), ref(x, t).sample, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = preset("digits", image_size=8)
    plain = UNet(cfg)
    ckpt = UNet(UNetConfig.from_dict({**cfg.to_dict(), "gradient_checkpointing": True}))
    ckpt.load_state_dict(plain.state_dict())
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([1.0, 50.0, 500.0, 999.0])
    for net in (plain, ckpt):
        net.train()
        net(x, t).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_bf16_autocast_forward_is_close_to_float32():
    torch.manual_seed(0)
    net = UNet(preset("digits")).eval()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([1.0, 50.0, 500.0, 999.0])
    with torch.no_grad():
        ref = net(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, t)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("stride,size", [(1, 4), (1, 8), (2, 8), (1, 32)])
def test_conv3x3_matrix_product_path_equals_the_convolution(stride, size):
    """The im2col path (inference, CPU, >= 512 output channels, few positions) computes the same
    function as nn.Conv2d; with gradients on, or many positions, it is the convolution itself."""
    from diffusekit.nn.unet import conv3x3

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(96, 512, 3, stride=stride, padding=1)
    x = torch.randn(2, 96, size, size)
    expected = conv(x)
    with torch.no_grad():
        torch.testing.assert_close(conv3x3(conv, x), expected, atol=2e-5, rtol=1e-5)
    with torch.enable_grad():
        out = conv3x3(conv, x)
    assert out.requires_grad and torch.equal(out, expected)


def test_augmentation_level_embedding():
    """SR3/Imagen noise-conditioning augmentation: the concat image's noise level enters the time
    embedding; it is required when configured and refused otherwise."""
    # 8 groups: with one channel per group, GroupNorm would cancel any per-channel embedding
    cfg = UNetConfig(in_channels=1, image_size=8, block_out_channels=(32, 32), attention_resolutions=(),
                     concat_channels=1, augmentation_embedding=True, norm_groups=8)
    net = UNet(cfg).eval()
    x, low = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    t = torch.tensor([10.0, 500.0])
    a = net(x, t, concat=low, aug_level=torch.tensor([0.0, 0.0]))
    b = net(x, t, concat=low, aug_level=torch.tensor([0.0, 300.0]))
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="aug_level"):
        net(x, t, concat=low)
    with pytest.raises(ValueError, match="augmentation_embedding"):
        UNet(UNetConfig(in_channels=1, image_size=8, block_out_channels=(32, 32), attention_resolutions=()))(
            x, t, aug_level=t)
    with pytest.raises(ValueError, match="augmentation_embedding"):
        UNetConfig(in_channels=1, image_size=8, augmentation_embedding=True)


def test_small_attention_path_holds_no_token_by_token_tensor_for_backward():
    """The small-map attention keeps q/k/v and a per-row normaliser for its backward, not the
    [B*heads, N, N] probabilities (those would make a training step's peak memory exceed that of
    diffusers' flash attention); it saves nothing when no gradient is needed."""
    from diffusekit.nn.unet import SelfAttentionBlock

    block = SelfAttentionBlock(64, 8, UNetConfig(norm_groups=8))
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        block._small(block.group_norm(x).reshape(2, 64, 64)).sum().backward()
    assert saved and not [s for s in saved if s[-2:] == (64, 64) and len(s) == 3 and s[0] == 2 * 8]
    assert (16, 3, 8, 64) in saved and (16, 64, 1) in saved  # q/k/v and the normaliser
    saved.clear()
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        block._small(block.group_norm(x).reshape(2, 64, 64))
    assert saved == []


def test_small_attention_path_matches_sdpa_with_gradients():
    """The matmul path SelfAttentionBlock takes for few tokens on the CPU computes the same
    function, and the same gradients, as the scaled_dot_product_attention path."""
    from diffusekit.nn.unet import SelfAttentionBlock

    torch.manual_seed(0)
    block = SelfAttentionBlock(64, 8, UNetConfig(norm_groups=8))
    for p in block.parameters():  # non-trivial biases
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 64, 8, 8)

    def run(max_tokens):
        block.max_math_tokens = max_tokens
        xi = x.clone().requires_grad_()
        out = block(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = [xi.grad] + [p.grad.clone() for p in block.parameters()]
        block.zero_grad(set_to_none=True)
        return out.detach(), grads

    small, small_grads = run(64)
    sdpa, sdpa_grads = run(0)
    del block.max_math_tokens
    assert torch.allclose(small, sdpa, atol=1e-5)
    for a, b in zip(small_grads, sdpa_grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_conv1x1_matrix_product_equals_the_convolution():
    from diffusekit.nn.unet import conv1x1

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(48, 32, 1)
    x = torch.randn(2, 48, 8, 8, requires_grad=True)
    out = conv1x1(conv, x)
    ref = conv(x)
    assert torch.allclose(out, ref, atol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, conv.weight, conv.bias], g)
    want = torch.autograd.grad(ref, [x, conv.weight, conv.bias], g)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("cin,cout,height,width", [(2, 3, 1, 1), (8, 8, 1, 1), (6, 10, 3, 5), (64, 64, 8, 8), (16, 700, 4, 3), (16, 80, 2, 3)])
def test_upsample_conv3x3_is_nearest_upsampling_then_the_convolution(cin, cout, height, width):
    """The stride-2 transposed convolution with the summed 4x4 kernel (on the CPU, with at least
    half as many input positions as channels) and the fallback (the 1x1 input with 8 channels, and
    700 or 80 output channels: too few positions) both equal upsample-then-convolve, gradients included."""
    from diffusekit.nn.unet import upsample_conv3x3

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
    x = torch.randn(2, cin, height, width, requires_grad=True)
    out = upsample_conv3x3(conv, x)
    ref = conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert out.shape == (2, cout, 2 * height, 2 * width)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, conv.weight, conv.bias], g)
    want = torch.autograd.grad(ref, [x, conv.weight, conv.bias], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_upsampling_resblock_and_resampler_match_their_plain_definition():
    """Resample(up) and ResBlock(resample="up") through the transposed-convolution path give what
    upsample-then-convolve gives (the U-Net parity tests against diffusers cover Resample too)."""
    from diffusekit.nn import unet

    torch.manual_seed(0)
    cfg = UNetConfig(block_out_channels=(16, 32), norm_groups=8, head_dim=8, resample="resblock")
    block, resampler = unet.ResBlock(16, 16, 64, cfg, resample="up"), unet.Resample(16, up=True)
    x, temb = torch.randn(2, 16, 4, 4), torch.nn.functional.silu(torch.randn(2, 64))  # blocks get SiLU(temb)
    up = lambda z: torch.nn.functional.interpolate(z, scale_factor=2.0, mode="nearest")  # noqa: E731
    h = block.conv1(up(torch.nn.functional.silu(block.norm1(x))))
    h = block.norm2(h + block.time_emb_proj(temb)[:, :, None, None])
    expected = up(x) + block.conv2(torch.nn.functional.silu(h))
    torch.testing.assert_close(block(x, temb), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(resampler(x), resampler.conv(up(x)), atol=1e-5, rtol=1e-5)
