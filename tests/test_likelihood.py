"""Likelihoods against the Gaussian-mixture oracle, whose noised densities are exact.

Tolerances (float64, linear schedule with T = 1000 for the bound):
- ODE, exact trace, rtol = atol = 1e-7: the divergence integral with the oracle's own prior at
  sigma_max matches log p_{sigma_min} to 1e-5 (relative 1e-6 at far-out points); with the default
  N(0, sigma_max^2) prior at sigma_max = 1e4, to 2e-3 nats.
- ODE, Hutchinson: within 4 standard errors of the exact value at every point.
- VLB: the bound in expectation is exactly computable for one Gaussian and the Monte Carlo bound
  matches it within 4 standard errors; with `variance="beta"` it exceeds the true NLL by < 3 %,
  with DDPM's `posterior` variance by more (about 0.4-0.55 nats per dimension for smooth data).
"""

import math
from types import SimpleNamespace

import pytest
import torch

from diffusekit import Denoiser, GaussianMixture, NoiseSchedule
from diffusekit.metrics.likelihood import (
    EXACT_TRACE_MAX_DIM,
    bits_per_dim,
    continuous_to_bits_per_dim,
    dequantize,
    discretized_gaussian_log_prob,
    ode_log_likelihood,
    prior_kl,
    reverse_variances,
    vlb,
)

LEVELS = 256


@pytest.fixture(scope="module")
def linear():
    return NoiseSchedule.from_name("linear", 1000)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _quantise(x: torch.Tensor) -> torch.Tensor:
    k = ((x.clamp(-1, 1) + 1) * (LEVELS - 1) / 2).round()
    return 2 * k / (LEVELS - 1) - 1


def _bin_nll(mixture: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """-log P(bin of x) under a diagonal mixture: products of normal CDF differences, outer bins open."""
    x = x.reshape(x.shape[0], -1)
    half = 1 / (LEVELS - 1)
    inf = torch.tensor(math.inf, dtype=torch.float64)
    lo = torch.where(x <= -1 + 1e-9, -inf, x - half)
    hi = torch.where(x >= 1 - 1e-9, inf, x + half)
    normal = torch.distributions.Normal(mixture.means[None], mixture.stds[None])
    log_mass = (normal.cdf(hi[:, None]) - normal.cdf(lo[:, None])).log().sum(-1) + mixture.weights.log()
    return -torch.logsumexp(log_mass, -1)


FAR_2D = torch.tensor([[-2.0, 0.1], [2.2, 1.0], [0.0, 0.0], [6.0, -5.0], [-10.0, 8.0]], dtype=torch.float64)


# -- the probability-flow ODE ---------------------------------------------------------------------


@pytest.mark.parametrize("dim", [2, 4])
def test_ode_exact_trace_matches_the_mixture_density(mixture_2d, dim):
    mixture = mixture_2d if dim == 2 else GaussianMixture.random(4, 5, seed=1)
    x = FAR_2D if dim == 2 else torch.cat([mixture.sample(4, _gen(2)), torch.full((1, 4), 7.0, dtype=torch.float64)])
    s_min, s_max = 1e-4, 1e4
    r = ode_log_likelihood(mixture.denoiser, x, sigma_min=s_min, sigma_max=s_max, rtol=1e-7, atol=1e-7)
    target = mixture.log_prob(x, s_min)
    assert r.divergence.shape == (len(x), 1) and torch.equal(r.stderr, torch.zeros(len(x), dtype=torch.float64))
    # the solver alone: the oracle's exact noised density at the far end instead of the Gaussian prior
    solver_only = mixture.log_prob(r.x_end, s_max) + r.divergence[:, 0]
    assert torch.allclose(solver_only, target, rtol=1e-6, atol=1e-5)
    assert torch.allclose(r.log_prob, target, atol=2e-3)  # + the N(0, sigma_max^2) prior
    assert torch.allclose(r.log_prob, mixture.log_prob(x), atol=2e-3)  # sigma_min = 1e-4 is p_0 here
    assert target[-1] < -100  # the far-out point really is far out


def test_ode_hutchinson_is_unbiased_within_its_standard_error():
    """Checked with 32 probes, where the standard error is itself reliable (over 10 seeds the z-scores
    had spread 1.15 and no |z| above 3.7). Far-out points are left to the exact-trace test: between
    components the Jacobian is large and the probes' spread with it."""
    mixture = GaussianMixture.random(4, 5, seed=1)
    x = mixture.sample(5, _gen(3))
    options = dict(sigma_min=0.05, sigma_max=20.0, rtol=1e-4, atol=1e-4)
    exact = ode_log_likelihood(mixture.denoiser, x, **options)
    for probe in ("rademacher", "gaussian"):
        est = ode_log_likelihood(mixture.denoiser, x, trace="hutchinson", probe=probe, num_probes=32,
                                 generator=_gen(4), **options)
        assert est.divergence.shape == (len(x), 32) and (est.stderr > 0).all()
        z = (est.log_prob - exact.log_prob) / est.stderr
        assert z.abs().max() < 4.5, (probe, z)
        assert abs(z.sum()) / math.sqrt(len(z)) < 3.5, (probe, z)
        # the path is the same; only the divergence integral is estimated
        assert torch.allclose(est.x_end, exact.x_end, rtol=1e-3)


def test_ode_single_gaussian_closed_form():
    """For N(mu, s^2) the flow is x(sigma) = mu + (x - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma_min^2)),
    the divergence integral is 0.5 sum log((s^2 + sigma_max^2) / (s^2 + sigma_min^2)), and
    log p_{sigma_min} = log N(x; mu, s^2 + sigma_min^2)."""
    mu = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    s = torch.tensor([[0.2, 1.0, 0.05]], dtype=torch.float64)
    gauss = GaussianMixture(mu, s)
    x = mu + s * torch.randn(6, 3, generator=_gen(0), dtype=torch.float64) * 3
    s_min, s_max = 1e-3, 1e3
    r = ode_log_likelihood(gauss.denoiser, x, sigma_min=s_min, sigma_max=s_max, prior_std=math.sqrt(s_max**2 + 1),
                           rtol=1e-8, atol=1e-8)
    var_min, var_max = s**2 + s_min**2, s**2 + s_max**2
    assert torch.allclose(r.x_end, mu + (x - mu) * (var_max / var_min).sqrt(), rtol=1e-6)
    assert torch.allclose(r.divergence[:, 0], 0.5 * (var_max / var_min).log().sum(1).expand(6), atol=1e-6)
    expected = torch.distributions.Normal(mu, var_min.sqrt()).log_prob(x).sum(1)
    exact_prior = torch.distributions.Normal(mu, var_max.sqrt()).log_prob(r.x_end).sum(1)
    assert torch.allclose(exact_prior + r.divergence[:, 0], expected, atol=1e-6)
    assert torch.allclose(r.log_prob, expected, atol=0.02)  # with the prior N(0, 1 + s_max^2), not N(mu, var_max)


def test_ode_auto_trace_switches_to_hutchinson_in_high_dimension():
    dim = EXACT_TRACE_MAX_DIM + 36
    mu = torch.linspace(-1, 1, dim, dtype=torch.float64)[None]
    s = torch.linspace(0.1, 0.5, dim, dtype=torch.float64)[None]
    gauss = GaussianMixture(mu, s)
    x = gauss.sample(4, _gen(1))
    s_min, s_max = 1e-3, 1e3
    expected = torch.distributions.Normal(mu, (s**2 + s_min**2).sqrt()).log_prob(x).sum(1)
    for probe in ("rademacher", "gaussian"):
        r = ode_log_likelihood(gauss.denoiser, x, sigma_min=s_min, sigma_max=s_max, prior_std=math.sqrt(s_max**2 + 0.2),
                               probe=probe, generator=_gen(2))
        assert r.divergence.shape == (4, 4)  # four probes: Hutchinson was chosen
        tol = 4 * r.stderr + 0.05  # + the approximate prior, ~1e-2 here
        assert ((r.log_prob - expected).abs() < tol).all(), (probe, r.log_prob - expected, r.stderr)


def test_ode_on_a_vp_denoiser_uses_its_schedule_and_vp_prior(mixture_2d):
    """Through a discrete eps model the defaults are the schedule's sigma range and x_T ~ N(0, I)."""
    sched = NoiseSchedule.from_name("linear", 1000)
    den = Denoiser(mixture_2d.eps_network(sched), sched, "eps")
    x = mixture_2d.sample(3, _gen(5))
    r = ode_log_likelihood(den, x, rtol=1e-7, atol=1e-7)
    target = mixture_2d.log_prob(x, sched.sigma_min)
    assert torch.allclose(mixture_2d.log_prob(r.x_end, sched.sigma_max) + r.divergence[:, 0], target, atol=1e-5)
    # the VP model's own prior N(0, 1 + sigma_max^2) (x_T ~ N(0, I)) is close to the truth at sigma_max = 157
    assert torch.allclose(r.log_prob, target, atol=2e-2)


# -- the variational bound ------------------------------------------------------------------------


def _expected_gaussian_vlb(sched, mu, s, x0, variance):
    """E over the noise of the bound with the Gaussian decoder, for data N(mu, diag s^2) and its exact
    denoiser x0_hat = mu + r (x - mu), r = s^2 / (s^2 + sigma^2): E (x0 - x0_hat)^2 =
    (1 - r)^2 (x0 - mu)^2 + r^2 sigma^2. Tables computed here from the schedule, independently."""
    abar, beta = sched.alphas_cumprod, sched.betas
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    var_q = beta * (1 - abar_prev) / (1 - abar)
    weight = beta * abar_prev.sqrt() / (1 - abar)
    var_p = beta.clone() if variance == "beta" else torch.cat([var_q[1:2], var_q[1:]])
    sigma = ((1 - abar) / abar).sqrt()[:, None, None]
    r = s**2 / (s**2 + sigma**2)
    mse = (1 - r) ** 2 * (x0 - mu) ** 2 + r**2 * sigma**2  # [T, B, D]
    kl = 0.5 * ((var_p / var_q).log()[1:, None, None] + (var_q / var_p)[1:, None, None] - 1
                + weight[1:, None, None] ** 2 * mse[1:] / var_p[1:, None, None])
    decoder = 0.5 * (mse[0] / var_p[0] + torch.log(2 * math.pi * var_p[0]))
    a = abar[-1]
    prior = 0.5 * (a * x0**2 + (1 - a) - 1 - torch.log(1 - a))
    return (prior + decoder + kl.sum(0)).sum(-1)


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_vlb_single_gaussian_matches_its_expectation_and_bounds_the_nll(linear, variance):
    mu = torch.tensor([0.5, -1.0], dtype=torch.float64)
    s = torch.tensor([0.3, 0.8], dtype=torch.float64)
    gauss = GaussianMixture(mu[None], s[None])
    x0 = gauss.sample(256, _gen(0))
    r = vlb(gauss.denoiser, x0, linear, variance=variance, decoder="gaussian", generator=_gen(1))
    expected = _expected_gaussian_vlb(linear, mu, s, x0, variance)
    diff = r.nll - expected
    assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(len(diff))
    # Averaged over the data the expected bound is above the entropy 0.5 log(2 pi e s^2), and close.
    # It is quadratic in x0, so the two points mu +- s give the data average exactly.
    entropy = 0.5 * torch.log(2 * math.pi * math.e * s**2).sum()
    gap = float(_expected_gaussian_vlb(linear, mu, s, torch.stack([mu + s, mu - s]), variance).mean() - entropy)
    assert gap > 0
    assert gap < (0.01 if variance == "beta" else 1.2)  # nats; about 0.004 and 1.13, of an entropy of 1.41


@pytest.fixture(scope="module")
def mixture_1d_bound(linear):
    """The full bound (Gaussian decoder) on 1-D mixture data through the discrete eps network."""
    mixture = GaussianMixture([[-2.0], [0.5], [2.5]], [[0.3], [0.5], [0.2]], [0.3, 0.5, 0.2])
    x0 = mixture.sample(256, _gen(0))
    den = Denoiser(mixture.eps_network(linear), linear, "eps")
    results = {v: vlb(den, x0, variance=v, decoder="gaussian", generator=_gen(1)) for v in ("posterior", "beta")}
    return mixture, x0, den, results


def test_vlb_is_an_upper_bound_close_to_the_nll(mixture_1d_bound):
    mixture, x0, _, results = mixture_1d_bound
    nll = -mixture.log_prob(x0)
    for variance, tight in (("beta", 0.03), ("posterior", 0.4)):
        r = results[variance]
        diff = r.nll - nll
        se = diff.std() / math.sqrt(len(diff))
        assert diff.mean() > -3 * se, variance
        assert diff.mean() < tight * nll.mean() + 3 * se, variance
    assert results["posterior"].nll.mean() - nll.mean() > 5 * se  # DDPM's small variance: clearly above


def test_vlb_terms_are_nonnegative_and_the_prior_is_closed_form(mixture_1d_bound, linear):
    _, x0, _, results = mixture_1d_bound
    for r in results.values():
        assert r.kl.shape == (len(x0), linear.num_steps - 1) and (r.kl >= 0).all()
        assert torch.equal(r.timesteps[0], torch.arange(1, linear.num_steps))
        a = linear.alphas_cumprod[-1]
        reference = torch.distributions.kl_divergence(torch.distributions.Normal(a.sqrt() * x0, (1 - a).sqrt()),
                                                      torch.distributions.Normal(0.0, 1.0)).sum(1)
        assert torch.allclose(r.prior, reference, rtol=1e-10, atol=1e-14)
        assert torch.allclose(r.nll, r.prior + r.decoder + r.kl.sum(1))
        assert torch.equal(r.stderr, torch.zeros(len(x0), dtype=torch.float64))


def test_vlb_subset_is_unbiased_with_a_calibrated_standard_error(mixture_1d_bound):
    _, x0, den, results = mixture_1d_bound
    full = results["beta"]
    sub = vlb(den, x0, variance="beta", decoder="gaussian", num_timesteps=40, generator=_gen(7))
    assert sub.kl.shape == sub.timesteps.shape == (len(x0), 40)
    assert (sub.timesteps >= 1).all() and (sub.timesteps <= 999).all()
    diff = sub.nll - full.nll
    se_of_mean = sub.stderr.pow(2).mean().sqrt() / math.sqrt(len(diff))
    assert abs(diff.mean()) < 4 * se_of_mean
    ratio = float(diff.std() / sub.stderr.pow(2).mean().sqrt())  # the spread the stderr claims
    assert 0.7 < ratio < 1.4, ratio


def test_vlb_discretised_decoder_bounds_the_binned_nll(linear):
    mixture = GaussianMixture([[-0.5, 0.2], [0.4, -0.3]], [[0.15, 0.2], [0.2, 0.1]], [0.6, 0.4])
    x0 = _quantise(mixture.sample(256, _gen(0)))
    true = _bin_nll(mixture, x0)
    den = Denoiser(mixture.eps_network(linear), linear, "eps")
    for variance, tight in (("beta", 0.02), ("posterior", 0.15)):
        r = vlb(den, x0, variance=variance, generator=_gen(1))
        diff = r.nll - true
        se = diff.std() / math.sqrt(len(diff))
        assert -3 * se < diff.mean() < tight * true.mean() + 3 * se, variance
        assert torch.allclose(r.bits_per_dim, r.nll / (2 * math.log(2)))


def test_discretized_gaussian_is_a_distribution_over_the_levels():
    k = torch.arange(LEVELS)
    for mean, std in ((0.3, 0.01), (-0.999, 0.5), (5.0, 0.2), (0.0, 1e-4)):
        logp = discretized_gaussian_log_prob(k, torch.full((LEVELS,), mean, dtype=torch.float64), std)
        assert not torch.isnan(logp).any() and (logp <= 0).all()
        assert float(torch.logsumexp(logp, 0)) == pytest.approx(0.0, abs=1e-10)


def test_reverse_variances(linear):
    post, large = reverse_variances(linear, "posterior"), reverse_variances(linear, "beta")
    assert torch.equal(large, linear.betas)
    assert post[0] == post[1] and (post[1:] < large[1:]).all() and (post > 0).all()


# -- bits per dimension of images -----------------------------------------------------------------


def test_bits_per_dim_of_images_by_both_methods(linear):
    """16-pixel 'images' from a mixture inside [-1, 1], quantised to 256 levels: the binned NLL is exact."""
    mixture = GaussianMixture.random(16, 3, seed=3, spread=0.3, std_range=(0.1, 0.25))
    images = _quantise(mixture.sample(64, _gen(0))).reshape(64, 1, 4, 4).float()
    true_bpd = (_bin_nll(mixture, images.double()) / (16 * math.log(2))).mean()
    model = SimpleNamespace(denoiser=mixture.denoiser, schedule=linear, image_shape=(1, 4, 4))
    bound = bits_per_dim(model, images, "vlb", variance="beta", generator=_gen(1))
    assert bound.bpd.shape == (64,) and bound.bpd.mean() > true_bpd - 0.02
    assert bound.bpd.mean() < true_bpd * 1.01
    ode = bits_per_dim(mixture.denoiser, images.double(), "ode", sigma_min=1e-4, sigma_max=1e4, trace="hutchinson",
                       rtol=1e-5, atol=1e-5, generator=_gen(2))
    se = ode.bpd.std() / 8
    assert abs(float(ode.bpd.mean() - true_bpd)) < 0.01 + 3 * se  # dequantisation's Jensen gap is tiny here
    assert (ode.stderr > 0).all()
    with pytest.raises(ValueError, match="shape"):
        bits_per_dim(model, images.reshape(64, 16), "vlb")


def test_dequantize_stays_in_the_bin_and_the_bpd_offset():
    images = _quantise(torch.rand(8, 3, 2, 2, generator=_gen(0), dtype=torch.float64) * 2 - 1)
    x = dequantize(images, generator=_gen(1))
    assert ((x - images).abs() <= 1 / 255).all() and (x != images).all()
    # a uniform density on [-1 - 1/255, 1 + 1/255] is exactly 8 bits per dimension
    nll = torch.full((8,), 12 * math.log(2 + 2 / 255), dtype=torch.float64)
    assert torch.allclose(continuous_to_bits_per_dim(nll, 12), torch.full((8,), 8.0, dtype=torch.float64))


# -- bad input --------------------------------------------------------------------------------------


def test_bad_input_gives_clear_errors(mixture_2d, linear):
    x = mixture_2d.sample(4, _gen(0))
    den = mixture_2d.denoiser
    with pytest.raises(ValueError, match="NaN"):
        vlb(den, torch.tensor([[0.0, math.nan]]), linear, decoder="gaussian")
    with pytest.raises(ValueError, match="NaN"):
        ode_log_likelihood(den, torch.tensor([[math.inf, 0.0]]), sigma_min=0.01, sigma_max=10)
    with pytest.raises(ValueError, match=r"\[B, \.\.\.\]"):
        ode_log_likelihood(den, torch.zeros(2, dtype=torch.float64), sigma_min=0.01, sigma_max=10)
    with pytest.raises(ValueError, match="discrete"):
        vlb(den, x, NoiseSchedule.from_name("edm"), decoder="gaussian")
    with pytest.raises(ValueError, match="schedule"):
        vlb(den, x, decoder="gaussian")
    with pytest.raises(ValueError, match="quantised"):
        vlb(den, x, linear)  # continuous data, discretised decoder
    with pytest.raises(ValueError, match="num_timesteps"):
        vlb(den, x, linear, decoder="gaussian", num_timesteps=1)
    with pytest.raises(ValueError, match="variance"):
        vlb(den, x, linear, decoder="gaussian", variance="learned")
    with pytest.raises(ValueError, match="sigma_min and sigma_max"):
        ode_log_likelihood(den, x)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        ode_log_likelihood(den, x, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="num_probes"):
        ode_log_likelihood(den, x, sigma_min=0.01, sigma_max=10, trace="hutchinson", num_probes=1)
    with pytest.raises(ValueError, match="differentiabl"):
        ode_log_likelihood(lambda x, s: mixture_2d.denoiser(x.detach(), s), x, sigma_min=0.01, sigma_max=10)
    with pytest.raises(ValueError, match="method"):
        bits_per_dim(den, x, "elbo", schedule=linear)
    assert prior_kl(linear, x).shape == (4,)
