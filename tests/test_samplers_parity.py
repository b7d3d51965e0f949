"""Parity: with the same denoiser, sigmas and initial noise (and the same noise draws for the
stochastic ones), each sampler reproduces its reference implementation to 1e-4 max abs on the oracle.

k-diffusion's functions get the exact mixture denoiser and EDM sigmas; diffusers' schedulers get the
exact eps network of a discrete VP model (ours sees it through `Denoiser(..., "eps")`) and our
float64 tables (`share_tables`), and our sampler walks the scheduler's own sigma sequence.
"""

import math

import pytest
import torch

from diffusekit import Denoiser, GaussianMixture, NoiseSchedule, sample

TOL = 1e-4
B = 32
# numpy 2 deprecation notices from diffusers' numpy calls on our (shared) torch tables
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture.random(4, 3, seed=1)


def _assert_close(ours, expected):
    diff = (ours - expected).abs().max().item()
    print(f"max abs diff {diff:.2e}")  # shown with pytest -s
    assert diff < TOL


def _x_T(dtype=torch.float64):
    return torch.randn(B, 4, generator=torch.Generator().manual_seed(0), dtype=dtype)


# -- k-diffusion ------------------------------------------------------------------------------------


def _noise_sampler(x, seed):
    """A k-diffusion noise sampler drawing in the order our samplers draw from their generator."""
    g = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(x.shape, generator=g, dtype=x.dtype)


class _BrownianNoiseSampler:
    """k-diffusion's dpmpp_sde asks for the normalised Brownian increments W(sigma -> sigma_mid) and
    then W(sigma -> sigma_next) (overlapping); build both from two independent increments, in the
    order our dpmpp_sde draws them."""

    def __init__(self, x, seed):
        self.x, self.g, self.calls = x, torch.Generator().manual_seed(seed), 0

    def __call__(self, sigma, sigma_to):
        self.calls += 1
        z = torch.randn(self.x.shape, generator=self.g, dtype=self.x.dtype)
        if self.calls % 2:
            self.z_1, self.sigma, self.sigma_mid = z, float(sigma), float(sigma_to)
            return z
        w_1, w_2 = self.sigma - self.sigma_mid, self.sigma_mid - float(sigma_to)
        return (math.sqrt(w_1) * self.z_1 + math.sqrt(w_2) * z) / math.sqrt(w_1 + w_2)


K_CASES = [
    # (ours, ours' options, k-diffusion function, its options; "noise"/"brownian": same draws)
    ("euler", {}, "sample_euler", {}),
    ("heun", {}, "sample_heun", {}),
    ("dpm2", {}, "sample_dpm_2", {}),
    ("lms", {}, "sample_lms", {}),
    ("lms", {"order": 2}, "sample_lms", {"order": 2}),
    ("dpmpp_2m", {}, "sample_dpmpp_2m", {}),
    ("dpmpp_2s_ancestral", {"eta": 0.0}, "sample_dpmpp_2s_ancestral", {"eta": 0.0}),
    ("dpmpp_sde", {"eta": 0.0}, "sample_dpmpp_sde", {"eta": 0.0}),
    ("dpmpp_2m_sde", {"eta": 0.0}, "sample_dpmpp_2m_sde", {"eta": 0.0}),
    ("dpmpp_3m_sde", {"eta": 0.0}, "sample_dpmpp_3m_sde", {"eta": 0.0}),
    ("euler_ancestral", {}, "sample_euler_ancestral", {"noise": True}),
    ("euler_ancestral", {"eta": 0.5, "s_noise": 0.8}, "sample_euler_ancestral", {"eta": 0.5, "s_noise": 0.8, "noise": True}),
    ("dpm2_ancestral", {}, "sample_dpm_2_ancestral", {"noise": True}),
    ("dpmpp_2s_ancestral", {}, "sample_dpmpp_2s_ancestral", {"noise": True}),
    ("dpmpp_sde", {}, "sample_dpmpp_sde", {"brownian": True}),
    ("dpmpp_sde", {"eta": 0.7, "r": 0.3}, "sample_dpmpp_sde", {"eta": 0.7, "r": 0.3, "brownian": True}),
    ("dpmpp_2m_sde", {}, "sample_dpmpp_2m_sde", {"noise": True}),
    ("dpmpp_2m_sde", {"eta": 0.5, "solver_type": "heun"}, "sample_dpmpp_2m_sde",
     {"eta": 0.5, "solver_type": "heun", "noise": True}),
    ("dpmpp_3m_sde", {}, "sample_dpmpp_3m_sde", {"noise": True}),
    ("ipndm", {}, "sample_ipndm", {}),  # not in k-diffusion 0.1.1 (skipped there)
    ("deis", {"order": 3, "lower_order_final": False}, "sample_deis", {}),  # idem
]


@pytest.mark.parametrize("method,options,ref_name,ref_options", K_CASES,
                         ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(K_CASES)])
def test_matches_k_diffusion(method, options, ref_name, ref_options, mixture, k_sampling):
    ref_fn = getattr(k_sampling, ref_name, None)
    if ref_fn is None:
        pytest.skip(f"this k-diffusion has no {ref_name}")
    sigmas = NoiseSchedule.continuous(0.002, 80.0).get_sigmas(12)
    x = _x_T() * 80
    ref_options = dict(ref_options)
    if ref_options.pop("noise", False):
        ref_options["noise_sampler"] = _noise_sampler(x, 3)
    if ref_options.pop("brownian", False):
        ref_options["noise_sampler"] = _BrownianNoiseSampler(x, 3)
    expected = ref_fn(mixture.denoiser, x.clone(), sigmas, disable=True, **ref_options)
    ours = sample(mixture.denoiser, x.clone(), sigmas, method, generator=torch.Generator().manual_seed(3), **options)
    _assert_close(ours, expected)


@pytest.mark.parametrize("method", ["euler", "heun", "dpm2"])
def test_churn_matches_k_diffusion(method, mixture, k_sampling):
    """EDM's churn at every step: k-diffusion draws from the global RNG, we from the generator."""
    ref_fn = {"euler": k_sampling.sample_euler, "heun": k_sampling.sample_heun, "dpm2": k_sampling.sample_dpm_2}[method]
    sigmas = NoiseSchedule.continuous(0.002, 80.0).get_sigmas(12)
    x = _x_T() * 80
    torch.manual_seed(5)
    expected = ref_fn(mixture.denoiser, x.clone(), sigmas, disable=True, s_churn=5.0, s_noise=1.003)
    ours = sample(mixture.denoiser, x, sigmas, method, generator=torch.Generator().manual_seed(5), s_churn=5.0, s_noise=1.003)
    _assert_close(ours, expected)
    plain = sample(mixture.denoiser, x, sigmas, method)
    assert (ours - plain).abs().max() > 1e-3  # the churn did something


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_adaptive_matches_k_diffusion(order, mixture, k_sampling):
    """Same accepted/rejected steps and the same endpoint at sigma_min, which we then denoise
    (k-diffusion computes its step sizes in the default dtype: make it float64 like ours)."""
    x = _x_T() * 80
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        expected, ref_info = k_sampling.sample_dpm_adaptive(mixture.denoiser, x.clone(), 0.002, 80.0, order=order,
                                                            disable=True, return_info=True)
    finally:
        torch.set_default_dtype(default)
    info = {}
    ours = sample(mixture.denoiser, x, NoiseSchedule.continuous(0.002, 80.0).get_sigmas(7), "dpm_adaptive", order=order, info=info)
    assert (info["n_accept"], info["n_reject"]) == (ref_info["n_accept"], ref_info["n_reject"])
    assert info["nfe"] == ref_info["nfe"] + 1
    _assert_close(ours, mixture.denoiser(expected, torch.full((B,), 0.002, dtype=torch.float64)))


def test_sigma_sequences_match_k_diffusion(k_sampling):
    """k-diffusion builds them in the default dtype; make it float64 (its float32 `exp(.) - 1`
    loses 2e-4 of the smallest vp sigma, which our expm1 keeps)."""
    sched = NoiseSchedule.continuous(0.002, 80.0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        poly = {rho: k_sampling.get_sigmas_polyexponential(15, 0.002, 80.0, rho=rho) for rho in (1.0, 2.5)}
        vp = k_sampling.get_sigmas_vp(15, beta_d=15.0, beta_min=0.2, eps_s=1e-2), k_sampling.get_sigmas_vp(15)
    finally:
        torch.set_default_dtype(default)
    for rho, expected in poly.items():
        assert torch.allclose(sched.get_sigmas(15, "polyexponential", rho=rho), expected, rtol=1e-10, atol=0)
    assert torch.allclose(sched.get_sigmas(15, "vp", beta_d=15.0, beta_min=0.2, eps_s=1e-2), vp[0], rtol=1e-10, atol=0)
    assert torch.allclose(sched.get_sigmas(15, "vp"), vp[1], rtol=1e-10, atol=0)
    assert torch.allclose(sched.get_sigmas(15, "polyexponential"), sched.get_sigmas(15, "exponential"))


# -- diffusers --------------------------------------------------------------------------------------

diffusers = pytest.importorskip("diffusers")

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def _schedule(config):
    return NoiseSchedule.from_name("scaled_linear" if config.get("beta_schedule") == "scaled_linear" else "linear")


def _run_sigma_space(ref, sched, mixture, n, x_T):
    """diffusers' Euler-family loop: its sample lives in sigma space; the model sees x / sqrt(1 + s^2)."""
    net = mixture.eps_network(sched)
    ref.set_timesteps(n)
    x = x_T * math.sqrt(1 + ref.sigmas[0].item() ** 2)
    start = x.clone()
    for t in ref.timesteps:
        x = ref.step(net(ref.scale_model_input(x, t), t.double().expand(B)), t, x).prev_sample
    return start, x


@pytest.mark.parametrize("method,scheduler,config", [
    ("euler", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("euler", "EulerDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1, **SD}),
    ("euler", "EulerDiscreteScheduler", {"use_karras_sigmas": True, **SD}),
    ("heun", "HeunDiscreteScheduler", {"timestep_spacing": "trailing", "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}),
    ("heun", "HeunDiscreteScheduler", {"use_karras_sigmas": True, **SD}),
    ("lms", "LMSDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("lms", "LMSDiscreteScheduler", {"use_karras_sigmas": True, **SD}),
])
def test_sigma_space_schedulers_match_diffusers(method, scheduler, config, mixture, share_tables):
    """Integer timesteps or Karras sigmas (timesteps interpolated in log sigma, as our denoiser
    does); diffusers' default `linspace` spacing interpolates sigma linearly between fractional
    timesteps, which no sigma-to-timestep map reproduces."""
    sched = _schedule(config)
    ref = getattr(diffusers, scheduler)(**config)
    share_tables(ref, sched)
    start, expected = _run_sigma_space(ref, sched, mixture, 15, _x_T())
    sigmas = torch.unique_consecutive(ref.sigmas.double())  # Heun repeats each inner sigma
    assert sigmas[-1] == 0 and len(sigmas) == 16
    ours = sample(Denoiser(mixture.eps_network(sched), sched, "eps"), start, sigmas, method)
    _assert_close(ours, expected)


def _run_vp(ref, sched, mixture, n, x_T, generator=None, **step_kwargs):
    """diffusers' VP loop: its sample is x_t = x / sqrt(1 + sigma^2); the model sees it directly."""
    net = mixture.eps_network(sched)
    ref.set_timesteps(n)
    x = x_T.clone()
    for t in ref.timesteps:
        kwargs = {"generator": generator} if generator is not None else {}
        x = ref.step(net(x, t.double().expand(B)), t, x, **kwargs, **step_kwargs).prev_sample
    return x


def _ours_vp(mixture, sched, x_T, sigmas, method, *, timestep_mode="interp", stop_before_zero=False, **options):
    """Our run from the same x_T; with stop_before_zero, the state at sigmas[-2] mapped back to the
    VP scale (for a reference that ends at the smallest table sigma instead of 0)."""
    trajectory = []
    den = Denoiser(mixture.eps_network(sched), sched, "eps", timestep_mode=timestep_mode)
    out = sample(den, x_T * math.sqrt(1 + sigmas[0].item() ** 2), sigmas, method,
                 callback=lambda info: trajectory.append(info["x"]), **options)
    if stop_before_zero:
        return trajectory[-2] / math.sqrt(1 + sigmas[-2].item() ** 2)
    return out


# (n, extra config) for the multistep solvers: default `linspace` integer timesteps, and Karras
# sigmas whose timesteps diffusers rounds to integers (our denoiser's timestep_mode="nearest").
MULTISTEP_GRIDS = [(8, {}), (25, {}), (12, {"use_karras_sigmas": True, **SD})]


DPM_SOLVERS = [("dpmpp_2m", {}, {}), ("dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, {"solver_type": "heun"})]
DPM_SOLVER_CASES = [(*solver, n, grid) for solver in DPM_SOLVERS for n, grid in MULTISTEP_GRIDS] + [
    # diffusers lowers the second-last step's order below 15 steps, we do not: 3M on long grids only
    ("dpmpp_3m_sde", {"eta": 0.0}, {"solver_order": 3, "solver_type": "heun"}, 25, {}),
    ("dpmpp_3m_sde", {"eta": 0.0}, {"solver_order": 3, "solver_type": "heun"}, 18, {"use_karras_sigmas": True, **SD}),
]


@pytest.mark.parametrize("method,options,config,n,grid", DPM_SOLVER_CASES)
def test_dpm_solver_multistep_matches_diffusers(method, options, config, n, grid, mixture, share_tables):
    """DPM-Solver++ with `final_sigmas_type="zero"` and `lower_order_final=True` (the defaults): its
    last step, to 0, is first order, like ours. 3M is our dpmpp_3m_sde with eta = 0."""
    sched = _schedule(grid)
    ref = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", final_sigmas_type="zero",
                                                lower_order_final=True, **grid, **config)
    share_tables(ref, sched)
    expected = _run_vp(ref, sched, mixture, n, _x_T())
    mode = "nearest" if grid.get("use_karras_sigmas") else "interp"
    _assert_close(_ours_vp(mixture, sched, _x_T(), ref.sigmas.double(), method, timestep_mode=mode, **options), expected)


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_sde_dpm_solver_matches_diffusers_with_the_same_noise(solver_type, mixture, share_tables):
    """diffusers' `sde-dpmsolver++` draws one float32 normal per step from the generator, as ours
    does (its step computes in float32, so compare in float32)."""
    sched = NoiseSchedule.from_name("linear")
    ref = diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_type=solver_type)
    share_tables(ref, sched)
    x_T = _x_T(torch.float32)
    expected = _run_vp(ref, sched, mixture, 20, x_T, generator=torch.Generator().manual_seed(9))
    ours = _ours_vp(mixture, sched, x_T, ref.sigmas.double(), "dpmpp_2m_sde", solver_type=solver_type,
                    generator=torch.Generator().manual_seed(9))
    assert ours.dtype == torch.float32
    _assert_close(ours, expected)
    other = _ours_vp(mixture, sched, x_T, ref.sigmas.double(), "dpmpp_2m_sde", solver_type=solver_type,
                     generator=torch.Generator().manual_seed(10))
    assert (other - expected).abs().max() > 1e-2


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("n,grid", [(10, {}), (20, {"use_karras_sigmas": True, **SD})])
def test_unipc_matches_diffusers(order, n, grid, mixture, share_tables):
    """bh2 with the defaults (`lower_order_final=True`, final sigma 0): the order falls to the steps
    left, as ours does by default. (diffusers' bh1 returns NaN on its last step to 0, B(h) = -inf
    times 0, so bh1 is compared at sigma_min below.)"""
    variant = "bh2"
    sched = _schedule(grid)
    ref = diffusers.UniPCMultistepScheduler(solver_type=variant, solver_order=order, **grid)
    share_tables(ref, sched)
    expected = _run_vp(ref, sched, mixture, n, _x_T())
    mode = "nearest" if grid.get("use_karras_sigmas") else "interp"
    ours = _ours_vp(mixture, sched, _x_T(), ref.sigmas.double(), "unipc", timestep_mode=mode, order=order, variant=variant)
    _assert_close(ours, expected)


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_matches_diffusers_at_sigma_min(variant, order, mixture, share_tables):
    """`final_sigmas_type="sigma_min"`, full order to the end: diffusers stops at sigma(t = 0); we
    walk the same sigmas plus a final 0 and are compared at sigma(t = 0)."""
    sched = NoiseSchedule.from_name("linear")
    ref = diffusers.UniPCMultistepScheduler(solver_type=variant, solver_order=order, final_sigmas_type="sigma_min",
                                            lower_order_final=False)
    share_tables(ref, sched)
    expected = _run_vp(ref, sched, mixture, 10, _x_T())
    sigmas = torch.cat([ref.sigmas.double(), torch.zeros(1, dtype=torch.float64)])
    ours = _ours_vp(mixture, sched, _x_T(), sigmas, "unipc", stop_before_zero=True, order=order, variant=variant,
                    lower_order_final=False)
    _assert_close(ours, expected)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_matches_diffusers(order, mixture, share_tables):
    """diffusers' DEIS ends at sigma(t = 0) (no final 0) and lowers the last orders only below 15
    steps; with 20 steps and `lower_order_final=False` ours takes the same steps, then denoises."""
    sched = NoiseSchedule.from_name("linear")
    ref = diffusers.DEISMultistepScheduler(solver_order=order)
    share_tables(ref, sched)
    expected = _run_vp(ref, sched, mixture, 20, _x_T())
    sigmas = torch.cat([ref.sigmas.double(), torch.zeros(1, dtype=torch.float64)])
    ours = _ours_vp(mixture, sched, _x_T(), sigmas, "deis", stop_before_zero=True, order=order, lower_order_final=False)
    _assert_close(ours, expected)


@pytest.mark.parametrize("skip_prk_steps", [True, False])
@pytest.mark.parametrize("set_alpha_to_one,offset", [(True, 1), (True, 0), (False, 1)])
def test_pndm_matches_diffusers(skip_prk_steps, set_alpha_to_one, offset, mixture, share_tables):
    """PNDMScheduler (`leading` spacing): skip_prk_steps=True is our `plms`, False our `pndm` with
    diffusers' Runge-Kutta midpoints (half a stride down) passed as `sigmas_mid`. Its last step
    goes to abar = 1 (sigma 0) or, with set_alpha_to_one=False, to sigma(t = 0)."""
    sched = NoiseSchedule.from_name("linear")
    ref = diffusers.PNDMScheduler(skip_prk_steps=skip_prk_steps, set_alpha_to_one=set_alpha_to_one, steps_offset=offset)
    share_tables(ref, sched)
    expected = _run_vp(ref, sched, mixture, 20, _x_T())
    sigmas = sched.sigmas[torch.as_tensor(ref._timesteps).long().flip(0)]
    if not set_alpha_to_one:
        sigmas = torch.cat([sigmas, sched.sigmas[:1]])
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
    if skip_prk_steps:
        options = {}
    else:
        options = {"sigmas_mid": sched.sigmas[torch.as_tensor(ref.prk_timesteps[1::4]).long()]}
    ours = _ours_vp(mixture, sched, _x_T(), sigmas, "plms" if skip_prk_steps else "pndm",
                    stop_before_zero=not set_alpha_to_one, **options)
    _assert_close(ours, expected)
