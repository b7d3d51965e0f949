"""Classifier-free guidance and thresholding wrappers: their defining identities on real networks."""

import pytest
import torch

from diffusekit import Denoiser, NoiseSchedule
from diffusekit.denoiser import DynamicThresholdDenoiser, GuidedDenoiser, concat_cond
from diffusekit.nn.unet import UNet, UNetConfig


def _randomise(net):
    # fresh U-Nets zero their output conv; random weights make every input matter
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


@pytest.fixture(scope="module")
def class_denoiser():
    torch.manual_seed(0)
    net = _randomise(UNet(UNetConfig(in_channels=1, image_size=8, block_out_channels=(8, 16), norm_groups=4,
                                     attention_resolutions=(4,), head_dim=8, num_classes=3)))
    return Denoiser(net, NoiseSchedule.from_name("linear", 1000), "eps")


@pytest.fixture(scope="module")
def text_denoiser():
    torch.manual_seed(0)
    net = _randomise(UNet(UNetConfig(in_channels=1, image_size=8, block_out_channels=(8, 16), norm_groups=4,
                                     attention_resolutions=(8, 4), head_dim=8, attention_type="transformer",
                                     context_dim=6)))
    return Denoiser(net, NoiseSchedule.from_name("linear", 1000), "v")


def _inputs(batch=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 8, 8, generator=g) * 3
    sigma = torch.tensor([0.3, 1.0, 4.0, 20.0])[:batch]
    return x, sigma


def test_cfg_scale_one_is_conditional_and_zero_is_unconditional(class_denoiser):
    x, sigma = _inputs()
    cond = {"class_labels": torch.tensor([0, 1, 2, 1])}
    uncond = {"class_labels": torch.tensor([3])}
    d_cond = class_denoiser(x, sigma, **cond)
    d_uncond = class_denoiser(x, sigma, class_labels=torch.full((4,), 3))
    assert not torch.allclose(d_cond, d_uncond, atol=1e-3)  # the label matters
    torch.testing.assert_close(GuidedDenoiser(class_denoiser, 1.0, uncond)(x, sigma, **cond), d_cond)
    torch.testing.assert_close(GuidedDenoiser(class_denoiser, 0.0, uncond)(x, sigma, **cond), d_uncond,
                               atol=2e-5, rtol=1e-5)
    w = 4.5  # the batched pass equals the two passes combined by hand
    torch.testing.assert_close(GuidedDenoiser(class_denoiser, w, uncond)(x, sigma, **cond),
                               d_uncond + w * (d_cond - d_uncond), atol=1e-4, rtol=1e-5)


def test_cfg_runs_one_batched_network_call(class_denoiser):
    calls = []
    hook = class_denoiser.network.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        x, sigma = _inputs()
        GuidedDenoiser(class_denoiser, 3.0, {"class_labels": torch.tensor([3])})(
            x, sigma, class_labels=torch.tensor([0, 1, 2, 1]))
    finally:
        hook.remove()
    assert calls == [8]


def test_guidance_interval_switches_per_sample(class_denoiser):
    x, sigma = _inputs()
    cond = {"class_labels": torch.tensor([0, 1, 2, 1])}
    uncond = {"class_labels": torch.tensor([3])}
    full = GuidedDenoiser(class_denoiser, 5.0, uncond)(x, sigma, **cond)
    d_cond = class_denoiser(x, sigma, **cond)
    out = GuidedDenoiser(class_denoiser, 5.0, uncond, interval=(0.5, 5.0))(x, sigma, **cond)
    inside = (sigma > 0.5) & (sigma <= 5.0)
    torch.testing.assert_close(out[inside], full[inside])
    torch.testing.assert_close(out[~inside], d_cond[~inside])


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_guidance_rescale_matches_std_in_the_networks_output_space(prediction, class_denoiser):
    den = Denoiser(class_denoiser.network, class_denoiser.schedule, prediction)
    x, sigma = _inputs()
    cond = {"class_labels": torch.tensor([0, 1, 2, 1])}
    uncond = {"class_labels": torch.tensor([3])}
    plain = GuidedDenoiser(den, 6.0, uncond)(x, sigma, **cond)
    torch.testing.assert_close(GuidedDenoiser(den, 6.0, uncond, rescale=0.0)(x, sigma, **cond), plain)
    full = GuidedDenoiser(den, 6.0, uncond, rescale=1.0)(x, sigma, **cond)
    half = GuidedDenoiser(den, 6.0, uncond, rescale=0.5)(x, sigma, **cond)
    c_skip, c_out = (c.float().reshape(-1, 1, 1, 1) for c in den.precondition(sigma)[:2])
    raw = lambda d: (d - c_skip * x) / c_out  # noqa: E731  back to what the network predicts (eps or v)
    f_cond = den.network_output(x, sigma, **cond)
    torch.testing.assert_close(raw(full).std((1, 2, 3)), f_cond.std((1, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(raw(half), 0.5 * raw(full) + 0.5 * raw(plain), rtol=1e-4, atol=1e-4)


def test_text_guidance_pads_contexts_of_different_lengths(text_denoiser):
    x, sigma = _inputs()
    g = torch.Generator().manual_seed(2)
    context = torch.randn(4, 5, 6, generator=g)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    empty = torch.randn(1, 2, 6, generator=g)
    cond = {"context": context, "context_mask": mask}
    uncond = {"context": empty, "context_mask": torch.ones(1, 2, dtype=torch.bool)}
    d_cond = text_denoiser(x, sigma, **cond)
    d_uncond = text_denoiser(x, sigma, context=empty.expand(4, 2, 6), context_mask=torch.ones(4, 2, dtype=torch.bool))
    out = GuidedDenoiser(text_denoiser, 2.0, uncond)(x, sigma, **cond)
    torch.testing.assert_close(out, d_uncond + 2.0 * (d_cond - d_uncond), atol=1e-4, rtol=1e-5)
    # masked-out positions do not matter
    context2 = context.clone()
    context2[1, 3:] = 100.0
    torch.testing.assert_close(text_denoiser(x, sigma, context=context2, context_mask=mask), d_cond)


def test_dynamic_thresholding_invariants():
    class Fixed(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def forward(self, x, sigma, **cond):
            return self.value

    inside = torch.rand(3, 1, 8, 8) * 1.8 - 0.9
    torch.testing.assert_close(DynamicThresholdDenoiser(Fixed(inside))(inside, torch.ones(3)), inside)
    wild = torch.randn(3, 1, 8, 8) * torch.tensor([0.5, 3.0, 10.0]).reshape(3, 1, 1, 1)
    out = DynamicThresholdDenoiser(Fixed(wild), percentile=0.9)(wild, torch.ones(3))
    assert out.abs().max() <= 1.0 + 1e-6
    s = torch.quantile(wild.reshape(3, -1).abs(), 0.9, dim=1).clamp(min=1)
    torch.testing.assert_close(out, wild.clamp(-s.reshape(3, 1, 1, 1), s.reshape(3, 1, 1, 1)) / s.reshape(3, 1, 1, 1))
    assert (out.reshape(3, -1).abs() >= 1 - 1e-6).float().mean(1)[1:].min() >= 0.09  # saturated tail, sign kept
    torch.testing.assert_close(out.sign()[out != 0], wild.sign()[out != 0])


def test_bad_guidance_arguments(class_denoiser):
    with pytest.raises(ValueError, match="scale"):
        GuidedDenoiser(class_denoiser, -1.0, {})
    with pytest.raises(ValueError, match="rescale"):
        GuidedDenoiser(class_denoiser, 3.0, {}, rescale=2.0)
    with pytest.raises(ValueError, match="interval"):
        GuidedDenoiser(class_denoiser, 3.0, {}, interval=(2.0, 1.0))
    with pytest.raises(ValueError, match="same keywords"):
        concat_cond({"class_labels": torch.zeros(1)}, {"context": torch.zeros(1)})
    with pytest.raises(ValueError, match="percentile"):
        DynamicThresholdDenoiser(class_denoiser, percentile=1.5)
