"""Convergence order on the oracle: the slope of log RMSE against log step count, measured against
the exact probability-flow ODE endpoint from the same noise, matches each method's theory in its
asymptotic range (the step counts were chosen where the slopes have settled; run with -s to see
the errors and slopes).
"""

import math

import pytest
import torch

from diffusekit import Denoiser, NoiseSchedule, sample


def _order(steps, errors):
    """Least-squares slope of -log(error) against log(steps)."""
    u = torch.tensor([math.log(n) for n in steps], dtype=torch.float64)
    v = torch.tensor([math.log(e) for e in errors], dtype=torch.float64)
    u = u - u.mean()
    return -float((u * (v - v.mean())).sum() / (u * u).sum())


def _measure(denoiser, x, reference, sigmas_for, method, options, steps):
    errors = [(sample(denoiser, x, sigmas_for(n), method, **options) - reference).pow(2).mean().sqrt().item()
              for n in steps]
    order = _order(steps, errors)
    print(f"{method} {options}: errors {' '.join(f'{e:.2e}' for e in errors)} -> order {order:.2f}")
    return errors, order


@pytest.fixture(scope="module")
def edm_problem():
    from diffusekit import GaussianMixture

    mixture = GaussianMixture([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], [[0.3, 0.5], [0.6, 0.2], [0.4, 0.4]], [0.5, 0.3, 0.2])
    x = torch.randn(128, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    return mixture, x, mixture.ode_solve(x, 80.0)


# The samplers that end with x = D(x, sigma_min) reach the ODE endpoint only to about 6e-6 here
# (sigma_min = 0.002): every range below keeps the errors well above that.
EDM_CASES = [
    # method, options, step counts, theoretical order, tolerance
    ("euler", {}, [113, 160, 226, 320], 1, 0.15),
    ("heun", {}, [40, 56, 80, 113], 2, 0.25),
    ("dpm2", {}, [40, 56, 80, 113], 2, 0.25),
    ("dpmpp_2m", {}, [56, 80, 113, 160], 2, 0.25),
    ("dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, [56, 80, 113, 160], 2, 0.25),
    ("dpmpp_2s_ancestral", {"eta": 0.0}, [56, 80, 113, 160], 2, 0.25),
    ("lms", {"order": 3}, [160, 226, 320, 452], 3, 0.3),
    ("lms", {}, [160, 226, 320, 452], 4, 0.35),
    ("deis", {"order": 3}, [113, 160, 226, 320], 3, 0.3),
    ("unipc", {"order": 3, "corrector": False}, [40, 56, 80, 113], 3, 0.3),
    ("unipc", {"order": 2}, [113, 160, 226, 320], 3, 0.3),  # UniP-2 + UniC: one order more
    ("unipc", {"order": 3}, [40, 56, 80, 113], 4, 0.5),  # UniP-3 + UniC
    # Adams-Bashforth with the fixed equal-step weights is exact only on steps equal in sigma; on a
    # Karras grid the mismatch costs O(h^3) per step, so the order is 2 whatever its nominal order.
    ("ipndm", {}, [226, 320, 452], 2, 0.3),
    ("ipndm", {"order": 2}, [113, 160, 226, 320], 2, 0.2),
    ("plms", {}, [226, 320, 452], 2, 0.3),
    # DPM-Solver++(3M) as k-diffusion and diffusers write it weighs the second difference D2 by
    # half of what third order needs (D2 ~ h^2 D''/2 against a coefficient for h^2 D''), so it is
    # second order with a small constant; the tests above pin it to the references.
    ("dpmpp_3m_sde", {"eta": 0.0}, [56, 80, 113, 160, 226], 2, 0.45),
]


@pytest.mark.parametrize("method,options,steps,expected,tolerance", EDM_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in EDM_CASES])
def test_convergence_order_on_a_continuous_schedule(method, options, steps, expected, tolerance, edm_problem):
    mixture, x, reference = edm_problem
    edm = NoiseSchedule.continuous(0.002, 80.0)
    errors, order = _measure(mixture.denoiser, x, reference, lambda n: edm.get_sigmas(n, "karras"), method, options, steps)
    assert errors == sorted(errors, reverse=True)
    assert abs(order - expected) < tolerance


@pytest.mark.parametrize("method,options,steps,expected", [
    ("heun", {}, [40, 56, 80, 113], 2),
    ("dpmpp_2m", {}, [56, 80, 113, 160], 2),
])
def test_convergence_order_on_a_discrete_vp_eps_model(method, options, steps, expected, edm_problem):
    """The trained-model path: a 1000-step linear VP eps network behind `Denoiser`, Karras sigmas
    over its table, and the VP start x = noise sqrt(1 + sigma_max^2)."""
    mixture = edm_problem[0]
    sched = NoiseSchedule.from_name("linear")
    den = Denoiser(mixture.eps_network(sched), sched, "eps")
    noise = torch.randn(128, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = noise * math.sqrt(1 + sched.sigma_max**2)
    errors, order = _measure(den, x, mixture.ode_solve(x, sched.sigma_max), lambda n: sched.get_sigmas(n, "karras"),
                             method, options, steps)
    assert errors == sorted(errors, reverse=True)
    assert abs(order - expected) < 0.3


def test_dpm_adaptive_error_follows_its_tolerance(edm_problem):
    """The error-controlled solver: tightening rtol/atol 10x costs more evaluations and buys a
    proportionally smaller error (about tol^(order/(order+1))), whatever the given intermediate sigmas."""
    mixture, x, reference = edm_problem
    sigmas = NoiseSchedule.continuous(0.002, 80.0).get_sigmas(5)
    results = []
    for rtol in (1e-2, 1e-3, 1e-4):
        info = {}
        out = sample(mixture.denoiser, x, sigmas, "dpm_adaptive", rtol=rtol, atol=rtol / 10, info=info)
        results.append(((out - reference).pow(2).mean().sqrt().item(), info["nfe"]))
    print("dpm_adaptive (rmse, nfe):", results)
    (e1, n1), (e2, n2), (e3, n3) = results
    assert n1 < n2 < n3
    assert e2 < e1 / 3 and e3 < e2 / 3
    dense = NoiseSchedule.continuous(0.002, 80.0).get_sigmas(50)
    assert torch.equal(sample(mixture.denoiser, x, dense, "dpm_adaptive", rtol=1e-3, atol=1e-4),
                       sample(mixture.denoiser, x, sigmas, "dpm_adaptive", rtol=1e-3, atol=1e-4))
