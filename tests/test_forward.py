import math

import pytest
import torch

from diffusekit import Denoiser, NoiseSchedule
from diffusekit.forward import loss, loss_weight, q_posterior, q_sample, q_step, training_target


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_stepwise_and_closed_form_give_the_same_distribution(name):
    """x_t built step by step (x_t = sqrt(alpha_t) x_{t-1} + sqrt(1 - alpha_t) eps) has, at every
    step, the mean and variance of the closed form q(x_t | x0), and matches an independent sample of
    the closed form."""
    sched = NoiseSchedule.from_name(name, 1000)
    g = torch.Generator().manual_seed(0)
    n = 20000
    x0 = torch.tensor([-1.0, 0.3, 1.0], dtype=torch.float64).expand(n, 3)
    abar = sched.alphas_cumprod
    x = x0
    worst_theory, worst_pair = 0.0, 0.0
    for t in range(1000):
        x = q_step(sched, x, t, torch.randn(x.shape, generator=g, dtype=torch.float64))
        closed = q_sample(sched, x0, t, torch.randn(x.shape, generator=g, dtype=torch.float64))
        mean, var = abar[t].sqrt() * x0[0], 1 - abar[t]
        se_mean, se_var = (var / n).sqrt(), var * math.sqrt(2 / n)
        for sample in (x, closed):
            worst_theory = max(worst_theory, float(((sample.mean(0) - mean) / se_mean).abs().max()))
            worst_theory = max(worst_theory, float(((sample.var(0) - var) / se_var).abs().max()))
        worst_pair = max(worst_pair, float(((x.mean(0) - closed.mean(0)) / (se_mean * 2**0.5)).abs().max()))
        worst_pair = max(worst_pair, float(((x.var(0) - closed.var(0)) / (se_var * 2**0.5)).abs().max()))
    # 6000 z-scores per check: the largest of that many standard normals rarely exceeds 4.5
    assert worst_theory < 5.0
    assert worst_pair < 5.0


def test_stepwise_detects_a_wrong_alpha():
    """The comparison above has power: using abar in place of alpha at each step collapses the mean."""
    sched = NoiseSchedule.from_name("linear")
    x0 = torch.ones(5000, 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = x0
    for t in range(100):
        a = sched.alphas_cumprod[t]
        x = a.sqrt() * x + (1 - a).sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
    expected = float(sched.alphas_cumprod[99].sqrt())
    assert abs(float(x.mean()) - expected) > 50 * math.sqrt((1 - expected**2) / 5000)


@pytest.mark.parametrize("t", [0, 1, 10, 500, 999])
def test_posterior_is_gaussian_conditioning(t):
    """DDPM eqs. 6-7 equal conditioning the joint Gaussian (x_{t-1}, x_t) | x0 on x_t."""
    sched = NoiseSchedule.from_name("linear")
    x0 = torch.tensor([[0.7, -0.2]], dtype=torch.float64)
    x_t = torch.tensor([[1.5, 0.1]], dtype=torch.float64)
    mean, var = q_posterior(sched, x0, x_t, t)
    abar = sched.alphas_cumprod
    if t == 0:  # the previous "step" is x0 itself
        assert torch.equal(mean, x0) and (var == 0).all()
        return
    a_prev, a_t, alpha = abar[t - 1], abar[t], sched.alphas[t]
    var_prev, var_t, cov = 1 - a_prev, 1 - a_t, alpha.sqrt() * (1 - a_prev)
    m_prev, m_t = a_prev.sqrt() * x0, a_t.sqrt() * x0
    assert torch.allclose(mean, m_prev + cov / var_t * (x_t - m_t), rtol=1e-12)
    assert torch.allclose(var, (var_prev - cov**2 / var_t).expand_as(x0), rtol=1e-10)


def test_forward_bad_inputs():
    sched = NoiseSchedule.from_name("linear")
    x0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\]"):
        q_sample(sched, x0, 1000, torch.zeros_like(x0))
    with pytest.raises(ValueError, match="shape"):
        q_sample(sched, x0, torch.tensor([1, 2, 3]), torch.zeros_like(x0))
    with pytest.raises(ValueError, match="discrete"):
        q_sample(NoiseSchedule.from_name("edm"), x0, 1, x0)


# -- targets and the loss -------------------------------------------------------------------------


def _vp_targets(sched, t, x0, eps):
    a = sched.alphas_cumprod[t]
    return {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_training_targets_match_their_definitions(prediction):
    sched = NoiseSchedule.from_name("linear")
    den = Denoiser(torch.nn.Identity(), sched, prediction)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    target = training_target(den, x0, eps, sched.sigmas[t])
    expected = _vp_targets(sched, t[:, None], x0, eps)[prediction]
    assert torch.allclose(target, expected, atol=1e-10)


def test_snr_weights_closed_form():
    sched = NoiseSchedule.from_name("linear")
    sigma = sched.sigmas[torch.tensor([0, 100, 400, 700, 999])]  # SNR from ~1e4 down to ~4e-5
    snr = sigma**-2
    assert snr.max() > 100 and snr.min() < 0.01  # both clamps are exercised
    gamma = 5.0
    for floor in (0.0, 0.1, 1.0):
        x0_weight = snr.clamp(floor, gamma)
        # the same x0-space weight, seen through each parameterisation's output
        expected = {"eps": x0_weight / snr, "v": x0_weight / (snr + 1), "x0": x0_weight}
        for prediction, w in expected.items():
            den = Denoiser(torch.nn.Identity(), sched, prediction)
            assert torch.allclose(loss_weight(den, sigma, "min_snr", gamma, floor), w, rtol=1e-10)
            assert torch.equal(loss_weight(den, sigma, "uniform"), torch.ones_like(sigma))
    # the floor lifts only the high-noise end: where SNR >= floor the weights are min-SNR's
    den = Denoiser(torch.nn.Identity(), sched, "v")
    plain, floored = loss_weight(den, sigma, "min_snr"), loss_weight(den, sigma, "min_snr", snr_floor=0.1)
    assert torch.equal(floored[snr >= 0.1], plain[snr >= 0.1])
    assert (floored[snr < 0.1] > plain[snr < 0.1]).all()
    assert torch.allclose(floored[snr < 0.1], 0.1 / (snr[snr < 0.1] + 1), rtol=1e-10)
    with pytest.raises(ValueError, match="uniform, min_snr"):
        loss_weight(den, sigma, "p2")
    with pytest.raises(ValueError, match="snr_floor must lie in"):
        loss_weight(den, sigma, "min_snr", 5.0, 6.0)


class _CheatingNetwork(torch.nn.Module):
    """Knows the clean batch, so from x_t and t it can output the exact target."""

    def __init__(self, sched, x0, prediction):
        super().__init__()
        self.sched, self.x0, self.prediction = sched, x0, prediction
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x_t, t):
        assert torch.equal(t, t.round()), "a discrete model is fed integer timesteps in training"
        a = self.sched.alphas_cumprod[t.long()][:, None].float()
        eps = (x_t - a.sqrt() * self.x0) / (1 - a).sqrt()
        return self.scale * _vp_targets(self.sched, t.long()[:, None], self.x0, eps)[self.prediction].float()


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("weighting", ["uniform", "min_snr"])
def test_loss_is_zero_for_the_exact_target_and_reproducible(prediction, weighting):
    sched = NoiseSchedule.from_name("linear")
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    net = _CheatingNetwork(sched, x0, prediction)
    den = Denoiser(net, sched, prediction)
    assert loss(den, x0, weighting=weighting, generator=torch.Generator().manual_seed(0)) < 1e-8
    # a wrong network output gives a positive loss whose gradient reaches the parameters
    with torch.no_grad():
        net.scale.fill_(1.5)
    value = loss(den, x0, weighting=weighting, generator=torch.Generator().manual_seed(0))
    assert value > 1e-3
    value.backward()
    assert net.scale.grad is not None and net.scale.grad > 0
    again = loss(den, x0, weighting=weighting, generator=torch.Generator().manual_seed(0))
    assert again.item() == value.item()


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_snr_floor_scales_the_loss_only_at_high_noise(prediction):
    """At one noise level the loss is weight x squared error, so a floor above that level's SNR
    multiplies min-SNR's loss by floor / SNR, and one below it changes nothing."""
    sched = NoiseSchedule.from_name("linear")
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    net = _CheatingNetwork(sched, x0, prediction)
    with torch.no_grad():
        net.scale.fill_(1.5)
    den = Denoiser(net, sched, prediction)
    for t, floor in ((900, 0.1), (50, 0.1)):
        sigma = sched.sigmas[t].repeat(16)
        snr = float(sched.sigmas[t]) ** -2
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
        plain = loss(den, x0, weighting="min_snr", sigma=sigma, noise=noise)
        floored = loss(den, x0, weighting="min_snr", snr_floor=floor, sigma=sigma, noise=noise)
        expected = floor / snr if snr < floor else 1.0
        torch.testing.assert_close(floored / plain, torch.tensor(expected, dtype=plain.dtype), rtol=1e-4, atol=0)


def test_uniform_eps_loss_of_a_zero_network_is_the_noise_power():
    """L_simple = E|eps - 0|^2 = 1 for a network that predicts nothing."""
    sched = NoiseSchedule.from_name("linear")
    den = Denoiser(lambda x, t: torch.zeros_like(x), sched, "eps")
    value = loss(den, torch.zeros(4096, 8), generator=torch.Generator().manual_seed(0))
    assert value.item() == pytest.approx(1.0, abs=0.01)


def test_continuous_loss_draws_edm_sigmas():
    from diffusekit.forward import sample_training_sigmas

    den = Denoiser(torch.nn.Identity(), NoiseSchedule.from_name("edm"), "edm")
    sigma = sample_training_sigmas(den, 200000, generator=torch.Generator().manual_seed(0))
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.01)
    assert sigma.log().std().item() == pytest.approx(1.2, abs=0.01)
