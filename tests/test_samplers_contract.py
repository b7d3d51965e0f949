"""The sampler contract for the whole suite: seeds, per-sample generators, the distribution the
stochastic samplers draw, the step to sigma = 0, shapes and dtypes, closed-form reductions between
samplers, the callback, and bad options."""

import math

import pytest
import torch

from diffusekit import SAMPLERS, GaussianMixture, NoiseSchedule, sample, seeded_generators
from diffusekit.sampling import get_sampler

EDM = NoiseSchedule.continuous(0.002, 80.0)

# every way of making a sampler stochastic: its name, options, and whether sample i is independent
# of the batch (dpm_adaptive shares one step-size sequence across the batch, by design)
STOCHASTIC = [(name, {}, True) for name in sorted(SAMPLERS) if SAMPLERS[name].stochastic] + [
    ("euler", {"s_churn": 20.0}, True),
    ("heun", {"s_churn": 20.0}, True),
    ("dpm2", {"s_churn": 20.0}, True),
    ("dpm_adaptive", {"eta": 1.0}, False),
]


@pytest.mark.parametrize("method,options,per_sample", STOCHASTIC, ids=[f"{c[0]}-{c[1]}" for c in STOCHASTIC])
def test_stochastic_samplers_reproduce_from_the_generator_only(method, options, per_sample, mixture_2d):
    sigmas = EDM.get_sigmas(10)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80

    def run(seed, x=x):
        return sample(mixture_2d.denoiser, x, sigmas, method, generator=torch.Generator().manual_seed(seed), **options)

    torch.manual_seed(0)
    a = run(3)
    torch.manual_seed(1)  # the global RNG must not matter
    assert torch.equal(run(3), a)
    assert (run(4) - a).abs().max() > 1e-3
    if not per_sample:
        return

    def run_gens(seed, n, start):
        gens = seeded_generators(seed, n, start=start)
        return sample(mixture_2d.denoiser, x[start:start + n], sigmas, method, generator=gens, **options)

    full = run_gens(7, 6, 0)
    assert torch.equal(run_gens(7, 2, 4), full[4:])
    assert torch.equal(run_gens(7, 1, 3), full[3:4])
    assert (run_gens(8, 6, 0) - full).abs().max() > 1e-3


def _ks_distance(mixture, samples):
    """Kolmogorov-Smirnov distance to the exact CDF of a 1-D mixture."""
    xs = samples.flatten().double().sort().values
    n = len(xs)
    m, s, w = mixture.means[:, 0], mixture.stds[:, 0], mixture.weights
    cdf = (w * 0.5 * (1 + torch.erf((xs[:, None] - m) / (s * math.sqrt(2))))).sum(1)
    i = torch.arange(1, n + 1, dtype=torch.float64) / n
    return max((i - cdf).max().item(), (cdf - (i - 1 / n)).max().item())


@pytest.mark.parametrize("method,options,steps", [
    ("euler_ancestral", {}, 200),
    ("dpm2_ancestral", {}, 50),
    ("dpmpp_2s_ancestral", {}, 50),
    ("dpmpp_sde", {}, 50),
    ("dpmpp_2m_sde", {}, 50),
    ("dpmpp_2m_sde", {"solver_type": "heun"}, 50),
    ("dpmpp_3m_sde", {}, 50),
    ("dpm_adaptive", {"eta": 1.0}, 2),
])
def test_stochastic_samplers_draw_the_true_distribution(method, options, steps):
    """20,000 samples against the exact mixture CDF (KS at the 0.1% level); the same run with the
    noise scaled by 0.9 must fail the test, so it would catch a wrong noise level."""
    mixture = GaussianMixture([[-2.0], [0.5], [2.5]], [[0.3], [0.5], [0.2]], [0.3, 0.5, 0.2])
    n = 20000
    x = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    sigmas = EDM.get_sigmas(steps)
    critical = 1.95 / math.sqrt(n)
    good = sample(mixture.denoiser, x, sigmas, method, generator=torch.Generator().manual_seed(1), **options)
    assert _ks_distance(mixture, good) < critical
    wrong = sample(mixture.denoiser, x, sigmas, method, generator=torch.Generator().manual_seed(1), s_noise=0.9, **options)
    assert _ks_distance(mixture, wrong) > critical


@pytest.mark.parametrize("method", sorted(SAMPLERS))
def test_a_single_step_to_zero_is_the_denoiser(method, mixture_2d):
    """sigmas = [sigma, 0]: every sampler returns D(x, sigma), with no division by 0 or log(0)."""
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    out = sample(mixture_2d.denoiser, x, torch.tensor([3.0, 0.0]), method, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, mixture_2d.denoiser(x, torch.full((8,), 3.0, dtype=torch.float64)), atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", sorted(SAMPLERS))
def test_any_shape_and_dtype(method, mixture_2d):
    """x [B, ...]: a [B, 1, 2, 1] batch gives the [B, 2] result reshaped; float32 stays float32
    and (for the deterministic samplers; noise drawn in float32 is other noise) agrees with
    float64; bfloat16 runs and stays bfloat16."""
    sigmas = EDM.get_sigmas(8)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80

    def run(x_):
        return sample(mixture_2d.denoiser, x_, sigmas, method, generator=torch.Generator().manual_seed(1))

    flat = run(x)
    assert torch.allclose(run(x.reshape(16, 1, 2, 1)), flat.reshape(16, 1, 2, 1), atol=1e-10, rtol=0)
    single = run(x.float())
    assert single.dtype == torch.float32 and single.shape == x.shape
    if not SAMPLERS[method].stochastic:
        assert (single.double() - flat).abs().max() < 1e-3 * (1 + flat.abs().max())
    half = run(x.bfloat16())
    assert half.dtype == torch.bfloat16 and torch.isfinite(half.float()).all()


@pytest.mark.parametrize("method,options", [
    ("euler", {}), ("euler_ancestral", {"eta": 0.0}), ("lms", {"order": 1}), ("ipndm", {"order": 1}),
    ("deis", {"order": 1}), ("unipc", {"order": 1, "corrector": False}),
])
def test_first_order_members_reduce_to_ddim(method, options, mixture_2d):
    """Closed forms: at order 1 (or eta = 0) these are the same map as deterministic DDIM,
    x_next = D + (sigma_next / sigma) (x - D)."""
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    sigmas = EDM.get_sigmas(12)
    ours = sample(mixture_2d.denoiser, x, sigmas, method, **options)
    assert torch.allclose(ours, sample(mixture_2d.denoiser, x, sigmas, "ddim"), atol=1e-10, rtol=0)


def test_churn_only_inside_its_sigma_range(mixture_2d):
    """EDM churn acts for s_tmin <= sigma <= s_tmax only: outside every sigma it is plain Heun,
    with or without a generator."""
    sigmas = EDM.get_sigmas(10)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    plain = sample(mixture_2d.denoiser, x, sigmas, "heun")
    outside = sample(mixture_2d.denoiser, x, sigmas, "heun", s_churn=30.0, s_tmin=100.0, s_tmax=200.0,
                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain, outside)
    inside = sample(mixture_2d.denoiser, x, sigmas, "heun", s_churn=30.0, s_tmin=1.0, s_tmax=10.0,
                    generator=torch.Generator().manual_seed(0))
    assert (inside - plain).abs().max() > 1e-3


def test_unipc_final_corrector_spends_one_more_evaluation(mixture_2d):
    calls = []

    def counting(x, sigma):
        calls.append(float(sigma[0]))
        return mixture_2d.denoiser(x, sigma)

    sigmas = EDM.get_sigmas(8)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    plain = sample(counting, x, sigmas, "unipc", order=3)
    n_plain = len(calls)
    corrected = sample(counting, x, sigmas, "unipc", order=3, final_corrector=True)
    assert len(calls) - n_plain == n_plain + 1 == len(sigmas)
    assert calls[-1] == calls[-2] == sigmas[-2].item()  # re-evaluated at the last nonzero level
    assert (corrected - plain).abs().max() > 1e-6


@pytest.mark.parametrize("method", sorted(set(SAMPLERS) - {"dpm_adaptive"}))
def test_callback_reports_every_step(method, mixture_2d):
    sigmas = EDM.get_sigmas(6)
    seen = []
    out = sample(mixture_2d.denoiser, torch.randn(4, 2, dtype=torch.float64) * 80, sigmas, method,
                 generator=torch.Generator().manual_seed(0), callback=seen.append)
    assert [info["i"] for info in seen] == list(range(6))
    assert [info["sigma"] for info in seen] == sigmas[:-1].tolist()
    assert [info["sigma_next"] for info in seen] == sigmas[1:].tolist()
    assert torch.equal(seen[-1]["x"], out)
    assert all(info["denoised"].shape == out.shape for info in seen)


def test_dpm_adaptive_callback_and_info(mixture_2d):
    seen, info = [], {}
    out = sample(mixture_2d.denoiser, torch.randn(4, 2, dtype=torch.float64) * 80, EDM.get_sigmas(6), "dpm_adaptive",
                 callback=seen.append, info=info)
    assert len(seen) == info["n_accept"] + 1 and seen[-1]["sigma_next"] == 0.0 and torch.equal(seen[-1]["x"], out)
    assert seen[0]["sigma"] == pytest.approx(80.0) and seen[-1]["sigma"] == pytest.approx(0.002)
    assert info["nfe"] == 3 * (info["n_accept"] + info["n_reject"]) + 1


@pytest.mark.parametrize("method,options,match", [
    ("lms", {"order": 5}, "order"),
    ("lms", {"order": 0}, "order"),
    ("ipndm", {"order": 5}, "order"),
    ("deis", {"order": 4}, "order"),
    ("unipc", {"order": 4}, "order"),
    ("unipc", {"variant": "bh3"}, "variant"),
    ("dpm_adaptive", {"order": 1}, "order"),
    ("dpm_adaptive", {"h_init": 0.0}, "h_init"),
    ("dpm_adaptive", {"rtol": -1.0}, "rtol"),
    ("dpmpp_2m_sde", {"solver_type": "euler"}, "solver_type"),
    ("dpmpp_sde", {"r": 1.5}, "r must"),
    ("pndm", {"sigmas_mid": [1.0]}, "sigmas_mid"),
    ("heun", {"s_churn": -1.0}, "s_churn"),
    ("euler", {"s_noise": -0.5}, "s_noise"),
] + [(name, {"eta": -0.1}, "eta") for name in
     ("euler_ancestral", "dpm2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpm_adaptive")])
def test_bad_options_name_the_option(method, options, match, mixture_2d):
    with pytest.raises(ValueError, match=match):
        sample(mixture_2d.denoiser, torch.randn(4, 2) * 80, EDM.get_sigmas(8), method, **options)


@pytest.mark.parametrize("method", sorted(SAMPLERS))
def test_every_sampler_checks_sigmas_and_rejects_unknown_options(method, mixture_2d):
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="end in 0"):  # the sampler functions run to 0 ...
        get_sampler(method).fn(mixture_2d.denoiser, x, torch.tensor([2.0, 1.0]))
    # ... and `sample` stops a run at a level above 0 (tests/test_sampling.py checks the state there)
    partial = sample(mixture_2d.denoiser, x * 2, torch.tensor([2.0, 1.0]), method, generator=torch.Generator())
    assert partial.shape == x.shape and torch.isfinite(partial).all()
    with pytest.raises(ValueError, match="descending"):
        sample(mixture_2d.denoiser, x, torch.tensor([1.0, 2.0, 0.0]), method)
    with pytest.raises(TypeError):
        sample(mixture_2d.denoiser, x, torch.tensor([1.0, 0.0]), method, ordre=2)


def test_dpm_adaptive_stops_on_a_bad_denoiser():
    with pytest.raises(RuntimeError, match="not finite"):
        sample(lambda x, sigma: torch.full_like(x, float("nan")), torch.randn(4, 2), EDM.get_sigmas(4), "dpm_adaptive")


def test_lagrange_weights_closed_forms():
    """The multistep weights: on equal steps in sigma they are Adams-Bashforth's; they integrate
    polynomials in sigma (or in log sigma) of their degree exactly; the weights sum to the step."""
    from diffusekit.sampling.common import lagrange_weights
    from diffusekit.sampling.ode import ADAMS_BASHFORTH

    h = 0.3
    for order in (1, 2, 3, 4):
        nodes = [2.0 + k * h for k in range(order)]  # newest (current) first, descending sigma
        weights = lagrange_weights(nodes, 2.0, 2.0 - h)
        assert weights == pytest.approx([-h * c for c in ADAMS_BASHFORTH[order]], abs=1e-12)
    nodes, start, end = [1.5, 2.5, 4.0], 1.5, 0.7
    f = lambda s: 3 - s + 0.5 * s**2  # noqa: E731  degree 2: exact with 3 nodes
    assert sum(w * f(s) for w, s in zip(lagrange_weights(nodes, start, end), nodes)) == pytest.approx(
        (3 * end - end**2 / 2 + end**3 / 6) - (3 * start - start**2 / 2 + start**3 / 6), abs=1e-12)
    g = lambda s: 1 + 2 * math.log(s) - math.log(s) ** 2  # noqa: E731  quadratic in log(sigma)
    u = torch.linspace(math.log(end), math.log(start), 200001, dtype=torch.float64)
    integral = -torch.trapezoid(torch.tensor([g(math.exp(v)) * math.exp(v) for v in u.tolist()]), u).item()
    assert sum(w * g(s) for w, s in zip(lagrange_weights(nodes, start, end, log=True), nodes)) == pytest.approx(integral, abs=1e-8)
    assert sum(lagrange_weights(nodes, start, end, log=True)) == pytest.approx(end - start, abs=1e-12)
    assert sum(lagrange_weights(nodes, start, 0.0)) == pytest.approx(-start, abs=1e-12)
