import math

import pytest
import torch

from diffusekit import SAMPLERS, Denoiser, GaussianMixture, NoiseSchedule, sample, seeded_generators
from diffusekit.forward import q_posterior
from diffusekit.sampling import get_sampler, initial_noise

diffusers = pytest.importorskip("diffusers")


def _sd_schedule():
    return NoiseSchedule.from_name("scaled_linear")


# -- parity with diffusers ------------------------------------------------------------------------

@pytest.mark.parametrize("shared_tables", [False, True])
@pytest.mark.parametrize(
    "spacing,offset,set_alpha_to_one,eta,dtype",
    [
        ("leading", 1, False, 0.0, torch.float32),  # Stable Diffusion's DDIM settings
        ("trailing", 0, True, 0.0, torch.float32),
        ("leading", 1, False, 0.0, torch.float64),
        ("trailing", 0, True, 0.0, torch.float64),
        ("leading", 0, True, 1.0, torch.float64),
        ("trailing", 0, False, 0.5, torch.float64),
    ],
)
def test_ddim_matches_diffusers(spacing, offset, set_alpha_to_one, eta, dtype, shared_tables, share_tables):
    """Same eps model, same initial noise, same 50 timesteps (and the same noise draws for eta > 0)."""
    gm = GaussianMixture.random(4, 3, seed=1)
    sched = _sd_schedule()
    net = gm.eps_network(sched)
    ref = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        set_alpha_to_one=set_alpha_to_one, steps_offset=offset, timestep_spacing=spacing,
    )
    if shared_tables:
        share_tables(ref, sched)
    ref.set_timesteps(50)
    x_T = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=dtype)
    x, g = x_T.clone(), torch.Generator().manual_seed(5)
    for t in ref.timesteps:
        x = ref.step(net(x, t.double().expand(64)), t, x, eta=eta, generator=g).prev_sample

    sigmas = sched.get_sigmas(50, spacing, steps_offset=offset, set_alpha_to_one=set_alpha_to_one)
    trajectory = []
    ours = sample(Denoiser.from_network(net, sched, "eps"), x_T * math.sqrt(1 + sigmas[0].item() ** 2), sigmas,
                  "ddim", eta=eta, generator=torch.Generator().manual_seed(5),
                  callback=lambda info: trajectory.append(info["x"]))
    assert ours.dtype == dtype
    if not set_alpha_to_one:
        # diffusers stops at abar_0's noise level; we go on to denoise it. Compare at that level,
        # mapped back to the VP scale.
        s = sigmas[-2].item()
        ours = trajectory[-2] / math.sqrt(1 + s**2)
    # with diffusers' own tables the residual is their float32 alphas_cumprod (~1e-6 relative)
    assert (ours - x).abs().max() < (1e-5 if dtype == torch.float32 or not shared_tables else 1e-10)


@pytest.mark.parametrize("shared_tables", [False, True])
@pytest.mark.parametrize("num_steps,variance", [(1000, "fixed_small"), (50, "fixed_small"), (50, "fixed_large")])
def test_ddpm_matches_diffusers(num_steps, variance, shared_tables, share_tables):
    gm = GaussianMixture.random(3, 4, seed=2)
    sched = NoiseSchedule.from_name("linear")
    net = gm.eps_network(sched)
    ref = diffusers.DDPMScheduler(beta_schedule="linear", clip_sample=False, variance_type=variance)
    if shared_tables:
        share_tables(ref, sched)
    ref.set_timesteps(num_steps)
    x_T = torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, g = x_T.clone(), torch.Generator().manual_seed(7)
    for t in ref.timesteps:
        x = ref.step(net(x, t.double().expand(32)), t, x, generator=g).prev_sample
    sigmas = sched.get_sigmas(num_steps, "leading")
    assert torch.equal(sched.sigma_to_t(sigmas[:-1]).round().long(), ref.timesteps)
    ours = sample(Denoiser(net, sched, "eps"), x_T * math.sqrt(1 + sigmas[0].item() ** 2), sigmas, "ddpm",
                  variance="small" if variance == "fixed_small" else "large", generator=torch.Generator().manual_seed(7))
    # with diffusers' own float32 tables the residual is their rounding, accumulated over the steps
    assert (ours - x).abs().max() < (1e-10 if shared_tables else 5e-5)


@pytest.mark.parametrize("t,stride", [(999, 1), (500, 1), (500, 20), (40, 20), (1, 1)])
def test_ddpm_step_is_the_forward_posterior(t, stride):
    """One DDPM step from t to t - stride, with a denoiser that returns the true x0, draws from
    q(x_{t-stride} | x_t, x0) (DDPM eqs. 6-7 for the strided chain), mapped into sigma space."""
    base = NoiseSchedule.from_name("linear")
    # the strided chain is itself a VP schedule over the kept steps
    keep = torch.arange(t % stride, 1000, stride) if stride > 1 else torch.arange(1000)
    strided = NoiseSchedule.from_betas(1 - base.alphas_cumprod[keep] / torch.cat([torch.ones(1, dtype=torch.float64), base.alphas_cumprod[keep][:-1]]))
    i = int((keep == t).nonzero())
    n = 100000
    x0 = torch.full((n, 1), 0.8, dtype=torch.float64)
    x_t_vp = torch.full((n, 1), -0.4, dtype=torch.float64)
    mean_vp, var_vp = q_posterior(strided, x0, x_t_vp, i)
    s, s_next = base.sigmas[t].item(), (base.sigmas[t - stride].item() if t - stride >= 0 else 0.0)
    x = x_t_vp * math.sqrt(1 + s**2)
    steps = []
    sample(lambda x_, sig: x0, x, torch.tensor([s, s_next, 0.0] if s_next else [s, 0.0]), "ddpm",
           generator=torch.Generator().manual_seed(0), callback=lambda info: steps.append(info["x"]))
    out = steps[0]
    out_vp = out / math.sqrt(1 + s_next**2)
    assert out_vp.mean().item() == pytest.approx(mean_vp[0, 0].item(), abs=5 * math.sqrt(var_vp[0, 0].item() / n) + 1e-12)
    assert out_vp.var().item() == pytest.approx(var_vp[0, 0].item(), rel=0.02, abs=1e-12)


# -- the oracle: distribution and convergence ----------------------------------------------------


def _mixture_cdf(gm, x):
    m, s, w = gm.means[:, 0], gm.stds[:, 0], gm.weights
    return (w * 0.5 * (1 + torch.erf((x[:, None] - m) / (s * math.sqrt(2))))).sum(1)


def _ks_distance(gm, samples):
    xs = samples.flatten().double().sort().values
    n = len(xs)
    cdf = _mixture_cdf(gm, xs)
    i = torch.arange(1, n + 1, dtype=torch.float64) / n
    return max((i - cdf).max().item(), (cdf - (i - 1 / n)).max().item())


def test_ddpm_1000_steps_samples_the_true_mixture():
    """Kolmogorov-Smirnov against the exact mixture CDF, with the trained-model path (eps network
    behind a VP denoiser). The same test rejects a 10% error in the noise scale."""
    gm = GaussianMixture([[-2.0], [0.5], [2.5]], [[0.3], [0.5], [0.2]], [0.3, 0.5, 0.2])
    sched = NoiseSchedule.from_name("linear")
    den = Denoiser(gm.eps_network(sched), sched, "eps")
    sigmas = sched.get_sigmas(1000, "trailing")
    n = 20000
    critical = 1.95 / math.sqrt(n)  # KS at the 0.1% level
    x_T = initial_noise((n, 1), sigmas[0].item(), variance_preserving=True, generator=torch.Generator().manual_seed(0))
    good = sample(den, x_T, sigmas, "ddpm", generator=torch.Generator().manual_seed(1))
    assert _ks_distance(gm, good) < critical
    wrong = sample(den, x_T, sigmas, "ddpm", s_noise=0.9, generator=torch.Generator().manual_seed(1))
    assert _ks_distance(gm, wrong) > critical


def _empirical_order(errors, steps):
    slopes = [math.log(errors[i] / errors[i + 1]) / math.log(steps[i + 1] / steps[i]) for i in range(len(steps) - 1)]
    return sum(slopes) / len(slopes)


def test_ddim_converges_to_the_ode_with_first_order_error(mixture_2d):
    """Deterministic DDIM is Euler on the probability-flow ODE: halving the step size halves the
    error against the exact ODE endpoint from the same noise."""
    edm = NoiseSchedule.continuous(0.002, 80.0)
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    reference = mixture_2d.ode_solve(x, 80.0)
    steps = [50, 100, 200, 400]
    errors = [(sample(mixture_2d.denoiser, x, edm.get_sigmas(n, "karras"), "ddim") - reference).pow(2).mean().sqrt().item()
              for n in steps]
    assert errors[-1] < 0.01
    assert 0.85 < _empirical_order(errors, steps) < 1.25


def test_ddim_on_a_discrete_vp_model_converges_first_order(mixture_2d):
    sched = NoiseSchedule.from_name("linear")
    den = Denoiser(mixture_2d.eps_network(sched), sched, "eps")
    noise = torch.randn(128, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps, errors = [50, 100, 200], []
    for n in steps:
        sigmas = sched.get_sigmas(n, "uniform")
        x = noise * math.sqrt(1 + sigmas[0].item() ** 2)
        errors.append((sample(den, x, sigmas, "ddim") - mixture_2d.ode_solve(x, sigmas[0].item())).pow(2).mean().sqrt().item())
    assert 0.85 < _empirical_order(errors, steps) < 1.25


# -- the contract: seeds, NFE, bad input ---------------------------------------------------------


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_sample_i_is_the_same_whatever_the_batch(method, mixture_2d):
    sched = NoiseSchedule.from_name("linear")
    den = Denoiser(mixture_2d.eps_network(sched), sched, "eps")
    sigmas = sched.get_sigmas(20, "trailing")

    def run(seed, n, start):
        x = initial_noise((n, 2), sigmas[0].item(), variance_preserving=True,
                          generator=seeded_generators(seed, n, start=start))
        return sample(den, x, sigmas, method, eta=1.0, generator=seeded_generators(seed + 1, n, start=start)) \
            if method == "ddim" else sample(den, x, sigmas, method, generator=seeded_generators(seed + 1, n, start=start))

    full = run(0, 6, 0)
    assert torch.equal(run(0, 2, 4), full[4:])
    assert torch.equal(run(0, 1, 3), full[3:4])
    assert not torch.equal(run(1, 6, 0), full)  # another seed, other images
    assert full.unique(dim=0).shape[0] == 6  # diverse


def test_stochastic_samplers_use_only_the_given_generator(mixture_2d):
    sigmas = NoiseSchedule.continuous().get_sigmas(10)
    x = torch.randn(8, 2, dtype=torch.float64) * 80
    torch.manual_seed(0)
    a = sample(mixture_2d.denoiser, x, sigmas, "ddpm", generator=torch.Generator().manual_seed(3))
    torch.manual_seed(1)  # the global RNG must not matter
    b = sample(mixture_2d.denoiser, x, sigmas, "ddpm", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", sorted(SAMPLERS))
def test_nfe_is_documented_and_counted(method, mixture_2d):
    calls = []

    def counting(x, sigma, **cond):
        calls.append(1)
        return mixture_2d.denoiser(x, sigma)

    sigmas = NoiseSchedule.continuous().get_sigmas(12)
    sample(counting, torch.randn(4, 2) * 80, sigmas, method, generator=torch.Generator().manual_seed(0))
    expected = SAMPLERS[method].nfe(len(sigmas))
    if expected is None:  # data-dependent (adaptive step size): documented as such, not counted
        assert len(calls) > 0 and "data-dependent" in SAMPLERS[method].fn.__doc__
    else:
        assert len(calls) == expected
    assert "NFE" in SAMPLERS[method].fn.__doc__


def test_conditioning_reaches_the_denoiser(mixture_2d):
    seen = []

    def conditioned(x, sigma, class_labels=None):
        seen.append(class_labels)
        return mixture_2d.denoiser(x, sigma)

    labels = torch.tensor([1, 2])
    sample(conditioned, torch.randn(2, 2), torch.tensor([1.0, 0.0]), "ddim", cond={"class_labels": labels})
    assert seen and all(s is labels for s in seen)


def test_sampler_bad_inputs(mixture_2d):
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="ddim, ddpm"):
        sample(mixture_2d.denoiser, x, torch.tensor([1.0, 0.0]), "euler_magic")
    with pytest.raises(ValueError, match="end in 0"):  # the sampler functions themselves run to 0
        get_sampler("ddim").fn(mixture_2d.denoiser, x, torch.tensor([2.0, 1.0]))
    with pytest.raises(ValueError, match="descending"):
        sample(mixture_2d.denoiser, x, torch.tensor([1.0, 2.0, 0.0]), "ddim")
    with pytest.raises(ValueError, match="1-D"):
        sample(mixture_2d.denoiser, x, torch.tensor([[1.0, 0.0]]), "ddim")
    with pytest.raises(ValueError, match="finite"):
        sample(mixture_2d.denoiser, x, torch.tensor([float("nan"), 0.0]), "ddpm")
    with pytest.raises(ValueError, match="eta"):
        sample(mixture_2d.denoiser, x, torch.tensor([1.0, 0.0]), "ddim", eta=-1.0)
    with pytest.raises(ValueError, match="small, large"):
        sample(mixture_2d.denoiser, x, torch.tensor([1.0, 0.0]), "ddpm", variance="medium")
    with pytest.raises(ValueError, match="one per sample"):
        sample(mixture_2d.denoiser, x, torch.tensor([1.0, 0.5, 0.0]), "ddpm", generator=seeded_generators(0, 3))
    with pytest.raises(TypeError):
        sample(mixture_2d.denoiser, x, torch.tensor([1.0, 0.0]), "ddim", etta=0.5)  # a typo is not swallowed


@pytest.mark.parametrize("method", ["ddim", "heun", "dpmpp_2m", "unipc", "euler_ancestral", "dpmpp_sde"])
def test_a_run_ending_above_zero_stops_there(mixture_2d, method):
    """sigmas ending at s > 0: the state at s of the longer run, from exactly the same steps and
    noise, with no model evaluation spent on the step to 0."""
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(1)) * 8
    states = []
    sample(mixture_2d.denoiser, x, sigmas, method, generator=torch.Generator().manual_seed(2),
           callback=lambda step: states.append((step["sigma_next"], step["x"])))
    calls = []

    def counting(x, sigma, **cond):
        calls.append(1)
        return mixture_2d.denoiser(x, sigma, **cond)

    partial = sample(counting, x, sigmas[:4], method, generator=torch.Generator().manual_seed(2))
    expected = [state for level, state in states if level == 1.0][-1]
    torch.testing.assert_close(partial, expected, rtol=0, atol=0)
    assert len(calls) == {"heun": 6, "dpmpp_sde": 6}.get(method, 3)  # three steps, two evaluations each for 2nd order
