import math

import pytest
import torch

from diffusekit import Denoiser, GaussianMixture, NoiseSchedule


@pytest.fixture
def mixture_1d():
    return GaussianMixture([[-2.0], [0.5], [2.5]], [[0.3], [0.5], [0.2]], [0.3, 0.5, 0.2])


def test_log_prob_is_a_normalised_density(mixture_1d):
    grid = torch.linspace(-30, 30, 400001, dtype=torch.float64)[:, None]
    for sigma in (0.0, 0.5, 3.0):
        density = mixture_1d.log_prob(grid, sigma).exp()
        assert torch.trapezoid(density, grid[:, 0]).item() == pytest.approx(1.0, abs=1e-8)


def test_denoiser_equals_posterior_mean_by_quadrature(mixture_1d):
    """E[x0 | x] = int x0 p(x0) N(x; x0, sigma^2) dx0 / int p(x0) N(x; x0, sigma^2) dx0."""
    x0_grid = torch.linspace(-8, 8, 400001, dtype=torch.float64)
    prior = mixture_1d.log_prob(x0_grid[:, None]).exp()
    x = torch.tensor([-3.0, -0.7, 0.0, 1.3, 4.0], dtype=torch.float64)
    for sigma in (0.05, 0.8, 5.0):
        like = torch.exp(-0.5 * ((x[:, None] - x0_grid) / sigma) ** 2)
        expected = torch.trapezoid(like * prior * x0_grid, x0_grid) / torch.trapezoid(like * prior, x0_grid)
        assert torch.allclose(mixture_1d.denoise(x[:, None], sigma)[:, 0], expected, atol=1e-7)


def test_score_is_the_gradient_of_log_prob(mixture_2d):
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_()
    sigma = 0.7
    (grad,) = torch.autograd.grad(mixture_2d.log_prob(x, sigma).sum(), x)
    assert torch.allclose(mixture_2d.score(x.detach(), torch.full((16,), sigma)), grad, atol=1e-10)


def test_sample_matches_the_mixture(mixture_2d):
    x = mixture_2d.sample(200000, torch.Generator().manual_seed(0))
    mean = (mixture_2d.weights[:, None] * mixture_2d.means).sum(0)
    assert torch.allclose(x.mean(0), mean, atol=0.02)
    second = (mixture_2d.weights[:, None] * (mixture_2d.means**2 + mixture_2d.stds**2)).sum(0)
    assert torch.allclose((x**2).mean(0), second, rtol=0.02)


def test_eps_network_gives_the_exact_denoiser_through_a_vp_denoiser(mixture_2d):
    sched = NoiseSchedule.from_name("linear")
    den = Denoiser(mixture_2d.eps_network(sched), sched, "eps")
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    sigma = sched.t_to_sigma(torch.tensor([0.0, 5.0, 99.5, 300.0, 512.25, 800.0, 950.0, 999.0]))
    assert torch.allclose(den(x, sigma), mixture_2d.denoise(x, sigma), atol=1e-9)


def test_ode_solver_matches_the_single_gaussian_closed_form():
    """For N(mu, s^2) the probability-flow ODE is x(sigma) = mu + (x_T - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma_T^2))."""
    mu, s = torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[0.5, 1.5, 0.05]])
    gauss = GaussianMixture(mu, s)
    x_t = torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 20
    for end in (0.0, 0.3):
        expected = mu + (x_t - mu) * ((s**2 + end**2) / (s**2 + 20.0**2)).sqrt()
        assert torch.allclose(gauss.ode_solve(x_t, 20.0, end), expected.double(), atol=1e-8)


def test_ode_reference_is_converged(mixture_2d):
    """Tightening the tolerance by 1000x changes the endpoint by far less than any sampler error."""
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    loose = mixture_2d.ode_solve(x, 80.0, rtol=1e-8, atol=1e-8)
    tight = mixture_2d.ode_solve(x, 80.0, rtol=1e-11, atol=1e-11)
    assert (loose - tight).abs().max() < 1e-6
    # and the endpoints land on the data: high density under the mixture
    assert mixture_2d.log_prob(tight).mean() > mixture_2d.log_prob(mixture_2d.sample(4096)).mean() - 1.0


def test_mixture_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"\[K, D\]"):
        GaussianMixture([1.0, 2.0])
    with pytest.raises(ValueError, match="stds"):
        GaussianMixture([[0.0, 0.0]], [[1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture([[0.0], [1.0]], 1.0, [1.0, -1.0])
    with pytest.raises(ValueError, match="sigma_start > sigma_end"):
        GaussianMixture([[0.0]]).ode_solve(torch.zeros(1, 1), 1.0, 2.0)
    bad = tmp_path / "spec.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read mixture spec"):
        GaussianMixture.from_json(bad)
    good = tmp_path / "good.json"
    good.write_text('{"means": [[0, 1], [2, 3]], "stds": 0.5, "weights": [1, 3]}')
    gm = GaussianMixture.from_json(good)
    assert gm.dim == 2 and gm.weights.tolist() == [0.25, 0.75] and math.isclose(gm.stds[1, 1].item(), 0.5)
