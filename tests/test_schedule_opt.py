"""The optimised sigma schedule: computed from the model alone, inside the model's noise range and
its stated budget, reproducible from a seed, and better than Karras with the same solver on a
mixture it was never tuned on."""

import math
from dataclasses import replace

import pytest
import torch

from diffusekit import Denoiser, GaussianMixture, NoiseSchedule, sample
from diffusekit.schedule_opt import Calibration, reference_endpoints, reference_state
from diffusekit.schedules import ALL_SPACINGS

SMALL = Calibration(num_samples=48, reference_steps=60, max_runs=60, dtype=torch.float64)


class CountingNetwork(torch.nn.Module):
    def __init__(self, network):
        super().__init__()
        self.network, self.calls = network, 0

    def forward(self, x, t, **cond):
        self.calls += 1
        return self.network(x, t, **cond)


@pytest.fixture(scope="module")
def held_out():
    """Not a bench mixture, and not one the optimiser was developed on."""
    return GaussianMixture.random(5, 4, seed=2024)


@pytest.fixture(scope="module")
def linear():
    return NoiseSchedule.from_name("linear")


@pytest.mark.parametrize("calibration", [SMALL, replace(SMALL, mining=3)], ids=["plain", "mined"])
def test_valid_in_range_and_within_budget(calibration, held_out, linear):
    network = CountingNetwork(held_out.eps_network(linear))
    denoiser = Denoiser(network, linear, "eps")
    asked = []

    def recording(x, sigma, **cond):
        asked.append(sigma.detach().clone())
        return denoiser(x, sigma, **cond)

    info = {}
    sigmas = linear.get_sigmas(6, "optimised", denoiser=recording, sample_shape=(5,), solver="unipc",
                               solver_options={"order": 3}, calibration=calibration, info=info)
    assert sigmas.shape == (7,) and sigmas.dtype == torch.float64
    assert sigmas[-1] == 0 and (sigmas[:-1] > sigmas[1:]).all()
    assert sigmas[0] == linear.sigma_max and sigmas[-2] >= linear.sigma_min
    # counted evaluations: exactly what it reports, never more than its stated bound
    nfe = 6  # unipc: one evaluation per step
    assert network.calls == info["model_calls"] == len(asked)
    # the model was only asked about noise levels inside its table
    asked = torch.cat(asked)
    assert asked.min() >= linear.sigma_min * (1 - 1e-12) and asked.max() <= linear.sigma_max * (1 + 1e-12)
    assert network.calls <= calibration.max_model_calls(nfe) \
        == calibration.reference_steps + (calibration.max_runs + 3 * calibration.mining) * nfe
    if calibration.mining:  # the screen ran: more calls than a plain calibration could make
        assert network.calls > SMALL.max_model_calls(nfe)
    assert info["loss_final"] <= info["loss_initial"]


def test_deterministic_for_a_seed(held_out, linear):
    denoiser = Denoiser(held_out.eps_network(linear), linear, "eps")

    def make(seed):
        return linear.get_sigmas(5, "optimised", denoiser=denoiser, sample_shape=(5,), solver="dpmpp_2m",
                                 seed=seed, calibration=SMALL)

    first = make(0)
    assert torch.equal(first, make(0))
    assert not torch.equal(first, make(1))  # other calibration noise, another optimum


def test_continuous_denoiser(held_out):
    """A continuous (EDM-range) model: variance-exploding start, same guarantees."""
    edm = NoiseSchedule.continuous(0.002, 80.0)
    info = {}
    sigmas = edm.get_sigmas(4, "optimised", denoiser=held_out.denoiser, sample_shape=(5,), solver="dpmpp_2m",
                            calibration=SMALL, info=info)
    assert sigmas[0] == 80.0 and sigmas[-1] == 0 and sigmas[-2] >= 0.002
    assert (sigmas[:-1] > sigmas[1:]).all()
    assert info["loss_final"] <= info["loss_initial"] and info["model_calls"] <= SMALL.max_model_calls(4)


@pytest.mark.parametrize("solver,options", [("unipc", {"order": 3}), ("dpmpp_2m", {})])
def test_beats_karras_on_a_held_out_mixture(solver, options, held_out, linear):
    """Discrete VP eps model, the same solver and NFE, fresh test noise (not the calibration's)."""
    denoiser = Denoiser(held_out.eps_network(linear), linear, "eps")
    z = torch.randn(400, 5, generator=torch.Generator().manual_seed(77), dtype=torch.float64)
    x = z * math.sqrt(1 + linear.sigma_max**2)
    exact = held_out.ode_solve(x, linear.sigma_max)
    calibration = Calibration(num_samples=128, reference_steps=100, max_runs=100, dtype=torch.float64)

    def rmse(sigmas):
        return float(((sample(denoiser, x, sigmas, solver, **options) - exact) ** 2).mean().sqrt())

    for n in (5, 10):
        optimised = linear.get_sigmas(n, "optimised", denoiser=denoiser, sample_shape=(5,), solver=solver,
                                      solver_options=options, calibration=calibration)
        karras = linear.get_sigmas(n, "karras")
        assert rmse(optimised) < 0.8 * rmse(karras), n


def test_reference_endpoint_extrapolates_past_sigma_min(linear):
    """The calibration target: a fine solve to sigma_min, then Richardson in sigma^2, lands far
    closer to the exact ODE endpoint than the usual last step x = D(x, sigma_min)."""
    mixture = GaussianMixture.random(2, 3, seed=5)
    denoiser = Denoiser(mixture.eps_network(linear), linear, "eps")
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = x * math.sqrt(1 + linear.sigma_max**2)
    exact = mixture.ode_solve(x, linear.sigma_max)
    at_sigma_min = mixture.ode_solve(x, linear.sigma_max, linear.sigma_min)
    last_step = denoiser(at_sigma_min, torch.full((64,), linear.sigma_min, dtype=torch.float64))
    ref = reference_endpoints(denoiser, x, linear.sigma_min, linear.sigma_max, 200)
    floor = float(((last_step - exact) ** 2).mean().sqrt())
    assert float(((ref - exact) ** 2).mean().sqrt()) < 0.2 * floor


def test_reference_trajectory_follows_the_exact_flow(linear):
    """The states `reference_endpoints` keeps, read back by `reference_state` at any level (stored
    or in between), are the exact ODE's states there, in VP units (divided by sqrt(1 + sigma^2))."""
    mixture = GaussianMixture.random(3, 4, seed=8)
    denoiser = Denoiser(mixture.eps_network(linear), linear, "eps")
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = x * math.sqrt(1 + linear.sigma_max**2)
    trajectory = []
    reference_endpoints(denoiser, x, linear.sigma_min, linear.sigma_max, 200, trajectory=trajectory)
    trajectory = torch.stack(trajectory)
    for sigma in (linear.sigma_max, 40.0, 3.3, 0.7, 0.05):
        exact = (x if sigma == linear.sigma_max else mixture.ode_solve(x, linear.sigma_max, sigma)) / math.sqrt(1 + sigma**2)
        ours = reference_state(trajectory, torch.tensor(sigma, dtype=torch.float64), linear.sigma_min,
                               linear.sigma_max, 200)
        assert float((ours.double() - exact).abs().max()) < 8e-3, sigma  # 0.07-0.1 at 1.1 sigma


def test_bad_input(held_out, linear):
    denoiser = Denoiser(held_out.eps_network(linear), linear, "eps")
    with pytest.raises(ValueError, match="denoiser="):
        linear.get_sigmas(5, "optimised")
    with pytest.raises(ValueError, match="optimised") as e:
        linear.get_sigmas(5, "optimized")
    assert all(name in str(e.value) for name in ALL_SPACINGS)
    with pytest.raises(ValueError, match="stochastic"):
        linear.get_sigmas(5, "optimised", denoiser=denoiser, sample_shape=(5,), solver="euler_ancestral",
                          calibration=SMALL)
    with pytest.raises(ValueError, match="data-dependent"):
        linear.get_sigmas(5, "optimised", denoiser=denoiser, sample_shape=(5,), solver="dpm_adaptive",
                          calibration=SMALL)
    with pytest.raises(ValueError, match="unknown sampler 'nope'; valid: .*unipc"):
        linear.get_sigmas(5, "optimised", denoiser=denoiser, sample_shape=(5,), solver="nope")
    with pytest.raises(ValueError, match="num_samples"):
        linear.get_sigmas(5, "optimised", denoiser=denoiser, sample_shape=(5,), calibration=Calibration(num_samples=0))
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="mining must be a non-negative integer"):
            linear.get_sigmas(5, "optimised", denoiser=denoiser, sample_shape=(5,), calibration=replace(SMALL, mining=bad))
    with pytest.raises(ValueError, match="mining needs num_samples >= 2"):
        linear.get_sigmas(5, "optimised", denoiser=denoiser, sample_shape=(5,),
                          calibration=replace(SMALL, num_samples=1, mining=2))
