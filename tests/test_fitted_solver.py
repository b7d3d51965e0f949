"""The fitted solver: its coefficient form holds every multistep sampler exactly, and the fit
(from the model alone, within its stated budget, reproducible from a seed) beats the best
built-in solvers on fresh noise of a mixture it was never developed on."""

import json
import math

import pytest
import torch

from diffusekit import Denoiser, GaussianMixture, NoiseSchedule, sample
from diffusekit.sampling import FittedCoefficients
from diffusekit.sampling.fitted import Direction
from diffusekit.schedule_opt import (EXTRAPOLATION_RATIO, TRAJECTORY_STRIDE, Calibration, SolverFit, _calibration_noise,
                                    _mined_noise, fit_solver, principal_directions, reference_endpoints)

MULTISTEP = [("ddim", {}), ("euler", {}), ("dpmpp_2m", {}), ("unipc", {"order": 2}), ("unipc", {"order": 3}),
             ("unipc", {"order": 3, "variant": "bh1"}), ("deis", {"order": 3}), ("ipndm", {}), ("lms", {"order": 4})]


class CountingNetwork(torch.nn.Module):
    """The mixture's eps network behind one (unused) trainable parameter, counting its calls."""

    def __init__(self, network):
        super().__init__()
        self.network, self.calls = network, 0
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, **cond):
        self.calls += 1
        return self.network(x, t, **cond) + 0 * self.unused


@pytest.fixture(scope="module")
def linear():
    return NoiseSchedule.from_name("linear")


@pytest.fixture(scope="module")
def held_out():
    """Not a bench mixture, and not one the fit was developed on."""
    return GaussianMixture.random(6, 5, seed=4242)


@pytest.mark.parametrize("method,options", MULTISTEP, ids=lambda v: str(v))
def test_coefficients_reproduce_each_multistep_sampler(method, options, linear):
    mixture = GaussianMixture.random(4, 3, seed=11)
    denoiser = Denoiser(mixture.eps_network(linear), linear, "eps")
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x * math.sqrt(1 + linear.sigma_max**2)
    sigmas = linear.get_sigmas(7, "karras")
    levels, coefficients = FittedCoefficients.from_sampler(sigmas, method, **options)
    assert torch.equal(levels, sigmas)
    expected = sample(denoiser, x, sigmas, method, **options)
    got = sample(denoiser, x, levels, "fitted", coefficients=coefficients)
    assert (got - expected).abs().max() < 1e-10


def test_coefficient_form_of_dpm_solver_2m():
    """Closed form: DPM-Solver++(2M) is x_{i+1} = r x_i + (1 - r)((1 + 1/2k) D_i - 1/2k D_{i-1}),
    r = sigma_{i+1} / sigma_i, k = h_{i-1} / h_i; first order on the first step, x = D at the end."""
    sigmas = torch.tensor([10.0, 4.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    _, c = FittedCoefficients.from_sampler(sigmas, "dpmpp_2m")
    assert c.x_scale == pytest.approx([0.4, 0.25, 0.5])
    k1 = math.log(10 / 4) / math.log(4)
    k2 = math.log(4) / math.log(2)
    assert c.weights[0] == pytest.approx([0.6])
    assert c.weights[1] == pytest.approx([-0.75 / (2 * k1), 0.75 * (1 + 1 / (2 * k1))])
    assert c.weights[2] == pytest.approx([0.0, -0.5 / (2 * k2), 0.5 * (1 + 1 / (2 * k2))])
    assert c.weights[3] == pytest.approx([0.0, 0.0, 0.0, 1.0])


def test_coefficients_check_and_round_trip():
    c = FittedCoefficients((0.5,), ((0.5,), (0.1, 0.9)))
    assert FittedCoefficients.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="need lists of numbers 'x_scale' and 'weights'"):
        FittedCoefficients.from_dict({"weights": [[1.0]]})
    with pytest.raises(ValueError, match="need lists of numbers .*could not convert"):
        FittedCoefficients.from_dict({"x_scale": ["half"], "weights": [[0.5], [0.1, 0.9]]})
    with pytest.raises(ValueError, match="n - 1 x_scale values"):  # the constructor's own check, not rewritten
        FittedCoefficients.from_dict({"x_scale": [0.5, 0.5], "weights": [[0.5], [0.1, 0.9]]})
    assert FittedCoefficients.from_tensors(*c.tensors()) == c
    with pytest.raises(ValueError, match="n - 1 x_scale values and n weight rows"):
        FittedCoefficients((0.5, 0.5), ((0.5,), (0.1, 0.9)))
    with pytest.raises(ValueError, match="row i of length i \\+ 1"):
        FittedCoefficients((0.5,), ((0.5, 0.1), (0.1, 0.9)))
    with pytest.raises(ValueError, match="finite"):
        FittedCoefficients((math.nan,), ((0.5,), (0.1, 0.9)))
    for method, options in (("heun", {}), ("plms", {}), ("euler_ancestral", {})):
        with pytest.raises(ValueError, match="multistep form|not a fixed-step deterministic"):
            FittedCoefficients.from_sampler(torch.tensor([10.0, 1.0, 0.1, 0.0]), method, **options)


def _gaussian_denoiser(rotation, variances):
    """The exact denoiser of N(0, Q diag(variances) Q^T): D(x, sigma) = Q diag(v / (v + sigma^2)) Q^T x."""
    def denoiser(x, sigma, **cond):
        y = x @ rotation
        return (y * variances / (variances + sigma[:, None] ** 2)) @ rotation.T
    return denoiser


def test_directions_make_two_steps_exact_on_gaussian_data():
    """Closed form: on N(0, Q diag(v) Q^T) the flow along a principal direction is
    y(sigma) = y(s) sqrt((v + sigma^2) / (v + s^2)). With x_1 = a x_0 and output w D_1 per direction,
    a = sqrt((v + s1^2) / (v + s0^2)), w = sqrt((v + s1^2) / v) is exact; one shared set is not.
    Three directions with their own numbers, the last two (equal variance) on the shared ones."""
    g = torch.Generator().manual_seed(3)
    rotation = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64)).Q
    variances = torch.tensor([9.0, 2.0, 0.5, 0.04, 0.04], dtype=torch.float64)
    denoiser = _gaussian_denoiser(rotation, variances)
    s0, s1 = 20.0, 1.5
    sigmas = torch.tensor([s0, s1, 0.0], dtype=torch.float64)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64) * math.sqrt(s0**2 + 1)
    exact = ((x @ rotation) * (variances / (variances + s0**2)).sqrt()) @ rotation.T

    def numbers(v):
        return (math.sqrt((v + s1**2) / (v + s0**2)),), ((0.0,), (0.0, math.sqrt((v + s1**2) / v)))

    directions = tuple(Direction(tuple(rotation[:, m].tolist()), *numbers(float(variances[m]))) for m in range(3))
    coefficients = FittedCoefficients(*numbers(0.04), directions)
    out = sample(denoiser, x, sigmas, "fitted", coefficients=coefficients)
    assert (out - exact).abs().max() < 1e-10
    assert FittedCoefficients.from_tensors(*coefficients.tensors(), coefficients.basis()) == coefficients
    assert FittedCoefficients.from_dict(json.loads(json.dumps(coefficients.to_dict()))) == coefficients
    for v in variances.tolist():  # any one shared set misses some direction
        shared = sample(denoiser, x, sigmas, "fitted", coefficients=FittedCoefficients(*numbers(v)))
        assert (shared - exact).abs().max() > 0.1
    # directions that carry the shared numbers change nothing
    same = FittedCoefficients(*numbers(2.0), tuple(Direction(d.vector, *numbers(2.0)) for d in directions))
    plain = sample(denoiser, x, sigmas, "fitted", coefficients=FittedCoefficients(*numbers(2.0)))
    assert (sample(denoiser, x, sigmas, "fitted", coefficients=same) - plain).abs().max() < 1e-12


def test_directions_bad_input():
    numbers = ((0.5,), ((0.5,), (0.1, 0.9)))
    with pytest.raises(ValueError, match="orthonormal"):
        FittedCoefficients(*numbers, (Direction((1.0, 1.0), *numbers),))
    with pytest.raises(ValueError, match="orthonormal"):
        FittedCoefficients(*numbers, (Direction((1.0, 0.0), *numbers), Direction((0.0, 1.0, 0.0), *numbers)))
    with pytest.raises(ValueError, match="for the shared numbers and every direction"):
        FittedCoefficients(*numbers, (Direction((1.0, 0.0), (0.5, 0.5), numbers[1]),))
    with pytest.raises(ValueError, match="finite"):
        FittedCoefficients(*numbers, (Direction((1.0, 0.0), (math.inf,), numbers[1]),))
    with pytest.raises(ValueError, match="'vector'"):
        FittedCoefficients.from_dict({"x_scale": [0.5], "weights": [[0.5], [0.1, 0.9]],
                                      "directions": [{"x_scale": [0.5], "weights": [[0.5], [0.1, 0.9]]}]})
    coefficients = FittedCoefficients(*numbers, (Direction((1.0, 0.0, 0.0), *numbers),))
    with pytest.raises(ValueError, match="samples of 3 numbers; got 2"):
        sample(lambda x, s: x, torch.ones(2, 2, dtype=torch.float64), torch.tensor([2.0, 1.0, 0.0]), "fitted",
               coefficients=coefficients)


def test_principal_directions_against_the_known_spectrum():
    """Samples of N(0, Q diag(v) Q^T) in 60 dimensions: the top 3 directions found by the subspace
    iteration (no 60 x 60 covariance) span Q's first three columns; with the size at most k + 8 the
    result is the covariance's eigenvectors."""
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64)).Q
    v = torch.cat([torch.tensor([25.0, 9.0, 4.0]), torch.full((57,), 0.1)]).double()
    samples = (torch.randn(20000, 60, generator=g, dtype=torch.float64) * v.sqrt()) @ q.T + 3.0
    basis = principal_directions(samples, 3, seed=1)
    assert basis.shape == (60, 3)
    assert torch.allclose(basis.T @ basis, torch.eye(3, dtype=torch.float64), atol=1e-10)
    overlap = (basis.T @ q[:, :3]).abs()  # |cosine| of each found direction with the true one
    assert overlap.diagonal().min() > 0.99
    small = samples[:, :6]
    values, vectors = torch.linalg.eigh(torch.cov(small.T))
    found = principal_directions(small, 2)
    assert torch.allclose((found.T @ vectors[:, [-1, -2]]).abs(), torch.eye(2, dtype=torch.float64), atol=1e-8)
    assert principal_directions(small, 10).shape == (6, 6)


def test_sampler_bad_input(linear):
    denoiser = Denoiser(GaussianMixture.random(2, 2, seed=1).eps_network(linear), linear, "eps")
    x = torch.randn(4, 2, dtype=torch.float64)
    sigmas = torch.tensor([10.0, 1.0, 0.0], dtype=torch.float64)
    assert torch.allclose(sample(denoiser, x, sigmas, "fitted"), sample(denoiser, x, sigmas, "dpmpp_2m"), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="coefficients must be a FittedCoefficients"):
        sample(denoiser, x, sigmas, "fitted", coefficients={"x_scale": [0.1]})
    _, three = FittedCoefficients.from_sampler(torch.tensor([10.0, 1.0, 0.1, 0.0]), "dpmpp_2m")
    with pytest.raises(ValueError, match="fitted for 3 noise levels; got 2"):
        sample(denoiser, x, sigmas, "fitted", coefficients=three)


def test_fit_beats_the_built_in_solvers_on_fresh_noise(held_out, linear):
    """Discrete VP eps model, NFE 5, fresh test noise (neither the calibration's nor its held-out
    part): the fitted solver against UniPC-3 on its own optimised schedule (the fit's start) and
    against DPM-Solver++(2M) / UniPC-3 on each built-in spacing. Within the stated budget; only the
    model's input gets gradients; the same seed gives the same solver."""
    network = CountingNetwork(held_out.eps_network(linear))
    denoiser = Denoiser(network, linear, "eps")
    settings = SolverFit(num_samples=1024, batch_size=256, reference_steps=100, iterations=150, dtype=torch.float64,
                         start=Calibration(num_samples=128, reference_steps=100, max_runs=80, dtype=torch.float64))
    info = {}
    fit = dict(sigma_min=linear.sigma_min, sigma_max=linear.sigma_max, sample_shape=(6,), variance_preserving=True,
               settings=settings, schedule=linear)
    sigmas, coefficients = fit_solver(denoiser, 5, info=info, **fit)
    assert network.calls == info["model_calls"] <= settings.max_model_calls(5)
    assert network.unused.grad is None
    assert sigmas.shape == (6,) and sigmas[-1] == 0 and (sigmas[:-1] > sigmas[1:]).all()
    assert sigmas[0] == linear.sigma_max and sigmas[-2] >= linear.sigma_min
    assert info["validation_mse"] <= info["validation_mse_start"]

    z = torch.randn(2000, 6, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    x = z * math.sqrt(1 + linear.sigma_max**2)
    exact = held_out.ode_solve(x, linear.sigma_max)

    def rmse(levels, method, **options):
        return float(((sample(denoiser, x, levels, method, **options) - exact) ** 2).mean().sqrt())

    ours = rmse(sigmas, "fitted", coefficients=coefficients)
    start = linear.get_sigmas(5, "optimised", denoiser=denoiser, sample_shape=(6,), solver="unipc",
                              solver_options={"order": 3}, calibration=settings.start, seed=0)  # the fit's start
    built_in = min(rmse(linear.get_sigmas(5, spacing), method, **options)
                   for method, options in (("dpmpp_2m", {}), ("unipc", {"order": 3}))
                   for spacing in ("karras", "exponential", "uniform", "leading", "trailing", "linspace"))
    # measured: fitted 0.253, UniPC-3 optimised 0.295, best built-in 0.308
    assert ours < 0.95 * rmse(start, "unipc", order=3)
    assert ours < 0.9 * built_in

    again, same = fit_solver(denoiser, 5, **fit)
    assert torch.equal(again, sigmas) and same == coefficients
    # 6 dimensions: every principal direction has numbers of its own, and they travel as JSON
    assert len(coefficients.directions) == 6
    assert any(d.weights != coefficients.weights for d in coefficients.directions)
    assert FittedCoefficients.from_dict(json.loads(json.dumps(coefficients.to_dict()))) == coefficients


def test_mined_noise_keeps_the_hardest_draws_and_weights_them_to_an_unbiased_mean(held_out, linear):
    """Mining: the kept half scores highest in its pool (the cheap solver's estimated error), the
    rest is drawn from the remainder, and the weights make the mean over the mined draws an
    unbiased estimate of the mean over all noise, which the plain mean is far from."""
    denoiser = Denoiser(held_out.eps_network(linear), linear, "eps")
    start = linear.get_sigmas(3, "trailing")
    fine = torch.cat([torch.linspace(math.log(linear.sigma_max), math.log(linear.sigma_min), 6,
                                     dtype=torch.float64).exp(), torch.zeros(1, dtype=torch.float64)])
    problem = dict(sample_shape=(6,), sigma_min=linear.sigma_min, sigma_max=linear.sigma_max, variance_preserving=True,
                   dtype=torch.float64, device="cpu")

    def scores(x):
        return ((sample(denoiser, x, start, "unipc", order=3) - sample(denoiser, x, fine, "unipc", order=3)) ** 2).mean(1)

    everything = scores(_calibration_noise(999, 16384, (6,), linear.sigma_max, True, torch.float64, "cpu")).mean()
    weighted, plain = [], []
    for seed in range(10):
        x, weights = _mined_noise(denoiser, 256, 4, start, seed=seed, cond=None, **problem)
        assert x.shape == (256, 6) and weights.shape == (256,) and float(weights.mean()) == pytest.approx(1.0)
        mined = scores(x)
        hard = weights < 1
        assert int(hard.sum()) == 128 and mined[hard].min() >= mined[~hard].max()
        weighted.append(float((weights * mined).mean()))
        plain.append(float(mined.mean()))
    assert sum(weighted) / 10 == pytest.approx(float(everything), rel=0.15)
    assert sum(plain) / 10 > 1.5 * float(everything)


def test_fit_with_mining_stays_within_its_budget(held_out, linear):
    network = CountingNetwork(held_out.eps_network(linear))
    denoiser = Denoiser(network, linear, "eps")
    settings = SolverFit(num_samples=256, batch_size=128, reference_steps=50, iterations=20, mining=4,
                         dtype=torch.float64, start=Calibration(num_samples=64, reference_steps=50, max_runs=20,
                                                                dtype=torch.float64))
    info = {}
    sigmas, coefficients = fit_solver(denoiser, 4, sigma_min=linear.sigma_min, sigma_max=linear.sigma_max,
                                      sample_shape=(6,), variance_preserving=True, settings=settings, schedule=linear,
                                      info=info)
    assert network.calls == info["model_calls"] <= settings.max_model_calls(4)
    assert info["validation_mse"] <= info["validation_mse_start"] and math.isfinite(info["validation_mse"])
    assert sigmas.shape == (5,) and sigmas[-1] == 0


def test_reference_trajectory_against_the_closed_form():
    """The states the fit's trajectory term compares against: for Gaussian data N(mu, s^2 I) the
    probability-flow ODE has x(sigma) = mu + (x(sigma_max) - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_max^2);
    they are kept every TRAJECTORY_STRIDE-th reference level, divided by sqrt(1 + sigma^2)."""
    schedule = NoiseSchedule.continuous(0.01, 100.0)  # the exact score at every sigma
    mu, s = torch.tensor([[0.7, -1.2, 0.3]], dtype=torch.float64), 0.4
    denoiser = GaussianMixture(mu, s).denoiser
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * schedule.sigma_max
    steps, trajectory = 50, []
    end = reference_endpoints(denoiser, x, schedule.sigma_min, schedule.sigma_max, steps, trajectory=trajectory)
    log_levels = torch.linspace(math.log(schedule.sigma_max), math.log(EXTRAPOLATION_RATIO * schedule.sigma_min), steps - 1,
                                dtype=torch.float64)[::TRAJECTORY_STRIDE]
    assert len(trajectory) == len(log_levels) and all(t.dtype == torch.float32 for t in trajectory)
    for state, sigma in zip(trajectory, log_levels.exp()):
        exact = mu + (x - mu) * math.sqrt((s**2 + sigma**2) / (s**2 + schedule.sigma_max**2))
        torch.testing.assert_close(state.double(), exact / math.sqrt(1 + sigma**2), atol=5e-4, rtol=0)  # solver error, 2e-4
    torch.testing.assert_close(end, mu + (x - mu) * s / math.sqrt(s**2 + schedule.sigma_max**2), atol=1e-5, rtol=0)


def test_fit_bad_input(held_out, linear):
    denoiser = Denoiser(held_out.eps_network(linear), linear, "eps")
    fit = dict(sigma_min=linear.sigma_min, sigma_max=linear.sigma_max, sample_shape=(6,), variance_preserving=True)
    with pytest.raises(ValueError, match="nfe"):
        fit_solver(denoiser, 0, **fit)
    with pytest.raises(ValueError, match="denoiser="):
        fit_solver(None, 5, **fit)
    for bad, message in ((dict(batch_size=0), "batch_size"), (dict(validation=1.0), "validation"),
                         (dict(learning_rate=0.0), "learning_rate"), (dict(num_samples=0), "num_samples"),
                         (dict(trajectory_weight=-1.0), "trajectory_weight"), (dict(directions=-1), "directions"),
                         (dict(directions=2.5), "directions"), (dict(direction_rate=0.0), "direction_rate"),
                         (dict(mining=-1), "mining")):
        with pytest.raises(ValueError, match=message):
            fit_solver(denoiser, 5, settings=SolverFit(**bad), **fit)
    small = SolverFit(num_samples=64, batch_size=16, reference_steps=20, iterations=2,
                      start=Calibration(num_samples=16, reference_steps=20, max_runs=5))
    with pytest.raises(RuntimeError, match="not finite on the calibration noise"):
        fit_solver(lambda x, sigma, **cond: x * math.nan, 3, settings=small, **fit)


def test_fit_on_a_network_leaves_its_weights_alone(linear):
    """A U-Net on images in float32 (the README's use): the fit runs within its budget, returns
    finite coefficients, and neither changes the weights nor leaves gradients on them."""
    from diffusekit.nn.unet import UNet, UNetConfig

    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=1, image_size=8, block_out_channels=(16, 16), norm_groups=8, head_dim=8,
                          attention_resolutions=())).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    denoiser = Denoiser(net, linear, "eps")
    settings = SolverFit(num_samples=16, batch_size=8, reference_steps=12, iterations=4, validate_every=2,
                         start=Calibration(num_samples=8, reference_steps=12, max_runs=6, mining=2))
    info = {}
    sigmas, coefficients = fit_solver(denoiser, 3, sigma_min=linear.sigma_min, sigma_max=linear.sigma_max,
                                      sample_shape=(1, 8, 8), variance_preserving=True, settings=settings,
                                      schedule=linear, info=info)
    assert info["model_calls"] <= settings.max_model_calls(3) and len(sigmas) == 4
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    x = torch.randn(2, 1, 8, 8) * math.sqrt(1 + linear.sigma_max**2)
    assert torch.isfinite(sample(denoiser, x, sigmas, "fitted", coefficients=coefficients)).all()
