import math

import pytest
import torch

from diffusekit import NoiseSchedule, abar_to_sigma, log_snr, sigma_to_abar
from diffusekit.schedules import MIN_ALPHA_CUMPROD, SPACINGS

diffusers = pytest.importorskip("diffusers")

# (our name, diffusers beta_schedule, beta range diffusers must be given)
SHARED = [
    ("linear", "linear", {}),
    ("scaled_linear", "scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
    ("cosine", "squaredcos_cap_v2", {}),
    ("sigmoid", "sigmoid", {}),
]


@pytest.mark.parametrize("name,diffusers_name,kwargs", SHARED)
def test_alphas_cumprod_match_diffusers(name, diffusers_name, kwargs):
    ref = diffusers.DDPMScheduler(beta_schedule=diffusers_name, **kwargs).alphas_cumprod.double()
    ours = NoiseSchedule.from_name(name).alphas_cumprod
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    # diffusers holds float32: relative agreement to 1e-6 wherever float32 can represent that
    # (abar >= 1e-3), and to float32's absolute resolution in the far tail (cosine reaches 2e-9,
    # where diffusers' float32 (1 - beta) with beta ~ 0.999 keeps only ~4 digits).
    relative = ((ours - ref).abs() / ref)[ref >= 1e-3]
    assert relative.max() < 1e-6
    assert (ours - ref).abs().max() < 1e-6
    if name != "cosine":
        assert ((ours - ref).abs() / ref).max() < 1e-6


@pytest.mark.parametrize("name,diffusers_name,kwargs", SHARED)
def test_zero_terminal_snr_matches_diffusers(name, diffusers_name, kwargs):
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    base = NoiseSchedule.from_name(name)
    ours = NoiseSchedule.from_name(name, zero_terminal_snr=True)
    # diffusers' own rescale run in float64 on the same betas: the same algorithm to rounding
    ref64 = torch.cumprod(1 - rescale_zero_terminal_snr(base.betas.clone()), 0)
    assert torch.allclose(ours.alphas_cumprod, ref64, rtol=1e-10, atol=1e-15)
    # and the float32 scheduler diffusers users get
    ref32 = diffusers.DDPMScheduler(beta_schedule=diffusers_name, rescale_betas_zero_snr=True, **kwargs)
    assert (ours.alphas_cumprod - ref32.alphas_cumprod.double()).abs().max() < 1e-6
    assert ours.alphas_cumprod[-1] == 0
    assert float(ours.alphas_cumprod[0]) == pytest.approx(float(base.alphas_cumprod[0]), rel=1e-12)
    # the terminal step is read as abar = 2**-24 (or half the previous abar) so sigma stays finite
    # and still increases with t
    terminal = min(MIN_ALPHA_CUMPROD, float(ours.alphas_cumprod[-2]) / 2)
    assert float(ours.sigmas[-1]) == pytest.approx(abar_to_sigma(terminal))
    assert torch.isfinite(ours.sigmas).all() and (ours.sigmas[1:] > ours.sigmas[:-1]).all()


def test_cosine_schedule_closed_form():
    sched = NoiseSchedule.from_name("cosine", 1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    # abar_t = f(t) / f(0) wherever the 0.999 clip is inactive
    for t in (0, 10, 500, 900):
        assert float(sched.alphas_cumprod[t]) == pytest.approx(f(t + 1) / f(0), rel=1e-12)
    assert float(sched.betas.max()) == pytest.approx(0.999)


def test_conversions_round_trip():
    abar = torch.tensor([0.9999, 0.5, 1e-4], dtype=torch.float64)
    sigma = abar_to_sigma(abar)
    assert torch.allclose(sigma_to_abar(sigma), abar, rtol=1e-14)
    assert torch.allclose(log_snr(sigma), (abar / (1 - abar)).log(), rtol=1e-12)
    assert abar_to_sigma(0.5) == pytest.approx(1.0) and log_snr(1.0) == 0.0
    # the schedule's sigmas are the VP model seen in sigma space
    sched = NoiseSchedule.from_name("linear")
    assert torch.allclose(sched.sigmas, ((1 - sched.alphas_cumprod) / sched.alphas_cumprod).sqrt())
    assert torch.allclose(sched.log_snr, log_snr(sched.sigmas))


def test_sigma_to_t_and_back():
    sched = NoiseSchedule.from_name("scaled_linear")
    t = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(sched.sigma_to_t(sched.sigmas), t, atol=1e-9)
    assert torch.equal(sched.sigma_to_t(sched.sigmas * 1.0001, mode="nearest"), t)
    frac = torch.tensor([0.25, 10.5, 998.75], dtype=torch.float64)
    sig = sched.t_to_sigma(frac)
    # fractional t interpolates log sigma linearly between neighbours
    lo, hi = sched.sigmas[frac.floor().long()].log(), sched.sigmas[frac.ceil().long()].log()
    assert torch.allclose(sig.log(), lo + (frac - frac.floor()) * (hi - lo))
    assert torch.allclose(sched.sigma_to_t(sig), frac, atol=1e-9)
    # out-of-range sigmas clamp to the ends
    assert sched.sigma_to_t(torch.tensor([1e-6, 1e6])).tolist() == [0.0, 999.0]
    with pytest.raises(ValueError, match="interp, nearest"):
        sched.sigma_to_t(torch.tensor([1.0]), mode="cubic")


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n", [1, 7, 50])
def test_get_sigmas_shape_and_order(spacing, n):
    sched = NoiseSchedule.from_name("linear")
    sigmas = sched.get_sigmas(n, spacing)
    assert sigmas.shape == (n + 1,) and sigmas.dtype == torch.float64
    assert sigmas[-1] == 0 and (sigmas[:-1] > 0).all()
    if n > 1:
        assert (sigmas[:-1] > sigmas[1:]).all()


def test_karras_and_exponential_formulas():
    sched = NoiseSchedule.continuous(0.002, 80.0)
    s = sched.get_sigmas(10, "karras", rho=7.0)
    assert s[0] == pytest.approx(80.0) and s[-2] == pytest.approx(0.002)
    i = torch.arange(10, dtype=torch.float64)
    expected = (80 ** (1 / 7) + i / 9 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(s[:-1], expected)
    e = sched.get_sigmas(10, "exponential")
    assert torch.allclose(e[:-2].log() - e[1:-1].log(), torch.full((9,), math.log(80 / 0.002) / 9, dtype=torch.float64))


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("n", [10, 30, 50, 1000])
def test_discrete_spacings_match_diffusers_timesteps(spacing, offset, n):
    if spacing == "leading" and offset and n == 1000:
        pytest.skip("diffusers yields t = 1000 here, past the table; we refuse it (test_bad_schedule_inputs)")
    from diffusekit.schedules import discrete_timesteps

    ref = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(n)
    ours = discrete_timesteps(1000, n, spacing, offset)
    assert ours.tolist() == ref.timesteps.tolist()
    sched = NoiseSchedule.from_name("linear")
    assert torch.equal(sched.get_sigmas(n, spacing, steps_offset=offset)[:-1], sched.sigmas[ours])


def test_set_alpha_to_one_false_ends_at_first_step():
    sched = NoiseSchedule.from_name("scaled_linear")
    s = sched.get_sigmas(50, "leading", steps_offset=1, set_alpha_to_one=False)
    assert len(s) == 52 and s[-2] == sched.sigmas[0] and s[-1] == 0


def test_bad_schedule_inputs():
    with pytest.raises(ValueError, match="linear, scaled_linear, cosine, sigmoid, edm"):
        NoiseSchedule.from_name("quadratic")
    with pytest.raises(ValueError, match="num_steps"):
        NoiseSchedule.from_name("linear", num_steps=1)
    with pytest.raises(ValueError, match="beta_end"):
        NoiseSchedule.from_name("linear", beta_end=1.5)
    with pytest.raises(ValueError, match="beta_start"):
        NoiseSchedule.from_name("linear", beta_start=0.0)
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
        NoiseSchedule.from_betas([0.1, 1.0, 0.2])
    with pytest.raises(ValueError, match="T >= 2"):
        NoiseSchedule.from_betas([0.1])
    with pytest.raises(ValueError, match="sigma_min"):
        NoiseSchedule.continuous(1.0, 0.5)
    sched = NoiseSchedule.from_name("linear")
    with pytest.raises(ValueError, match="karras, exponential"):
        sched.get_sigmas(10, "quadratic")
    with pytest.raises(ValueError, match="positive integer"):
        sched.get_sigmas(0)
    with pytest.raises(ValueError, match="exceeds"):
        sched.get_sigmas(1001, "trailing")
    with pytest.raises(ValueError, match="continuous"):
        NoiseSchedule.from_name("edm").get_sigmas(10, "leading")
    with pytest.raises(ValueError, match="steps_offset"):
        sched.get_sigmas(10, "leading", steps_offset=200)
    with pytest.raises(ValueError, match="steps_offset"):
        sched.get_sigmas(1000, "leading", steps_offset=1)
