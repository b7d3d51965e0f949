import math

import pytest
import torch

from diffusekit import Denoiser, NoiseSchedule


def _batch(seed=0, shape=(5, 3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_discrete_vp_round_trip(prediction, schedule):
    """A network that outputs the true eps / v / x0 for its (x_t, t) input yields the true x0, and
    it is fed exactly the x_t = sqrt(abar) x0 + sqrt(1 - abar) eps and t it was trained on."""
    sched = NoiseSchedule.from_name(schedule)
    x0, eps = _batch()
    t = torch.tensor([0, 1, 250, 700, 999])
    abar = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    truth = {"eps": eps, "x0": x0, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[prediction]

    def network(x_in, t_in):
        assert torch.allclose(x_in, x_t, atol=1e-12)
        assert torch.allclose(t_in, t.double(), atol=1e-6)
        return truth

    sigma = sched.sigmas[t]
    x = x0 + sigma.reshape(-1, 1, 1, 1) * eps  # the same point in sigma space
    assert torch.allclose(x, x_t / abar.sqrt())
    out = Denoiser.from_network(network, sched, prediction)(x, sigma)
    assert torch.allclose(out, x0, atol=1e-9)


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_edm_preconditioning_round_trip(sigma_data):
    """EDM (Karras et al. 2022, Table 1): F_target = (x0 - c_skip x) / c_out with the paper's
    c_skip, c_out, c_in and c_noise = ln(sigma) / 4."""
    x0, eps = _batch(1)
    sigma = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    s = sigma.reshape(-1, 1, 1, 1)
    x = x0 + s * eps
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s * sigma_data / (s**2 + sigma_data**2).sqrt()
    c_in = 1 / (s**2 + sigma_data**2).sqrt()

    def network(x_in, c_noise):
        assert torch.allclose(x_in, c_in * x)
        assert torch.allclose(c_noise, sigma.log() / 4)
        return (x0 - c_skip * x) / c_out

    out = Denoiser(network, NoiseSchedule.from_name("edm"), "edm", sigma_data=sigma_data)(x, sigma)
    assert torch.allclose(out, x0, atol=1e-9)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_continuous_parameterisations_round_trip(prediction):
    """The same parameterisations on a continuous (log-sigma conditioned) model."""
    x0, eps = _batch(2)
    sigma = torch.tensor([0.01, 0.3, 1.0, 5.0, 50.0], dtype=torch.float64)
    s = sigma.reshape(-1, 1, 1, 1)
    a, sv = 1 / (1 + s**2).sqrt(), s / (1 + s**2).sqrt()  # the VP alpha, sigma of this point
    truth = {"eps": eps, "x0": x0, "v": a * eps - sv * x0}[prediction]
    den = Denoiser(lambda x_in, c: truth, None, prediction, sigma_data=1.0)
    assert torch.allclose(den(x0 + s * eps, sigma), x0, atol=1e-9)


def test_timestep_mode_nearest_feeds_integer_steps():
    sched = NoiseSchedule.from_name("linear")
    seen = {}

    def network(x_in, t):
        seen["t"] = t
        return torch.zeros_like(x_in)

    sigma = sched.t_to_sigma(torch.tensor([10.4, 500.6]))
    Denoiser(network, sched, timestep_mode="nearest")(torch.zeros(2, 1), sigma)
    assert seen["t"].tolist() == [10.0, 501.0]
    Denoiser(network, sched)(torch.zeros(2, 1), sigma)
    assert torch.allclose(seen["t"], torch.tensor([10.4, 500.6]), atol=1e-4)


def test_denoiser_bad_inputs():
    sched = NoiseSchedule.from_name("linear")
    with pytest.raises(ValueError, match="eps, x0, v, edm"):
        Denoiser(torch.nn.Identity(), sched, "score")
    with pytest.raises(ValueError, match="sigma_data"):
        Denoiser(torch.nn.Identity(), sched, "eps", sigma_data=0.5)
    den = Denoiser(lambda x, t: x, sched, "eps")
    with pytest.raises(ValueError, match=r"sigma must have shape \[4\]"):
        den(torch.zeros(4, 2), torch.ones(3))
    bad = Denoiser(lambda x, t: x[:, :1], sched, "eps")
    with pytest.raises(ValueError, match="network returned shape"):
        bad(torch.zeros(4, 2), torch.ones(4))
    # a scalar sigma is broadcast over the batch
    assert den(torch.ones(4, 2), torch.tensor(1.0)).shape == (4, 2)


def test_denoiser_is_a_module_that_owns_the_network():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)

        def forward(self, x, t):
            return self.linear(x)

    net = Net()
    den = Denoiser(net, NoiseSchedule.from_name("linear"))
    assert list(den.parameters()) == list(net.parameters())
    assert not math.isnan(den(torch.zeros(3, 2), torch.ones(3)).sum().item())
