"""`diffusekit bench samplers`: samplers and sigma schedules on the exact oracle, against their peers.

Each case is a Gaussian mixture seen as a discrete 1,000-step variance-preserving eps model: the
mixture's exact eps network (`GaussianMixture.eps_network`) behind `Denoiser(..., "eps")`, which is
how most checkpoints are driven. Every method starts from the same VP noise x_T (x_T at
t = T - 1, i.e. `x_T * sqrt(1 + sigma^2)` in sigma space at the method's first noise level) and
is scored on:

- RMSE (per coordinate) against the exact probability-flow ODE endpoint from the same noise
  (`GaussianMixture.ode_solve` from sigma(t = T - 1) to 0), for deterministic methods;
- NLL gap: mean -log p(x) of the samples under the true density minus the same mean over the exact
  endpoints. The exact endpoints are exact data samples and share the noise, so the gap has little
  sampling noise; it is negative when a sampler sharpens the modes;
- SW: sliced Wasserstein-1 distance to fresh true samples (`GaussianMixture.sample`), averaged
  over 64 fixed random directions; the exact endpoints' own SW is printed as the floor.

NFE is counted by a wrapper around the network, for every method. Ours choose the number of
steps whose NFE is exactly the target (a method that cannot meet it is skipped and reported).
Peers (`peers=True`, test/bench-only dependencies, imported lazily): diffusers' schedulers, driven
by their own `set_timesteps` and `step` on the same eps network (their number of inference steps
chosen so that `len(timesteps)`, their NFE, is the target), with each built-in timestep spacing
and sigma option; and k-diffusion's samplers with each of its sigma schedules, on the same
denoiser (k-diffusion's `DiscreteEpsDDPMDenoiser` computes the same function).

The `optimised` spacing is computed per (mixture, sampler, NFE) from the model alone, with its own
calibration noise (never the bench's); so is the `fitted` solver (levels and coefficients,
`schedule_opt.fit_solver`) at NFE 5 and 10. Their one-off cost is printed, not counted in the NFE.

Reading the numbers: at 5-10 NFE on well-separated mixtures the RMSE is dominated by the few
samples a method sends to another mode than the exact flow does, so with a few hundred samples it
moves by tens of percent from one seed to the next; compare several mixtures (and seeds).
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .._utils import atomic_path
from ..denoiser import Denoiser
from ..oracle import GaussianMixture
from ..sampling import SAMPLERS, sample, seeded_generators
from ..schedule_opt import Calibration, SolverFit, fit_solver
from ..schedules import ALL_SPACINGS, NoiseSchedule

NFES = (5, 10, 20, 50)
DEFAULT_MIXTURES = ("2d", "64d")
# Deterministic samplers are scored on RMSE; the stochastic ones on the NLL gap and SW only.
DEFAULT_SAMPLERS = ("euler", "heun", "dpm2", "lms", "deis:order=3", "ipndm", "plms", "ddim", "dpmpp_2m",
                    "dpmpp_3m_sde:eta=0", "unipc:order=2", "unipc:order=3", "euler_ancestral", "dpmpp_2m_sde")
DEFAULT_SPACINGS = ("karras", "exponential", "polyexponential:rho=2", "vp", "uniform", "leading", "trailing",
                    "linspace", "optimised")
# The optimised schedule is computed per (mixture, sampler, NFE): only for these samplers by default.
DEFAULT_OPT_SAMPLERS = ("unipc:order=3", "unipc:order=2", "ipndm")
# The fitted solver (levels and coefficients fitted to the model) at these budgets by default.
DEFAULT_FIT_NFES = (5, 10)
# The optimised schedule's calibration: at 5-10 NFE the RMSE is carried by the draws that change
# mode (a few in a thousand), so 256 plain draws hold almost none; on 16,384 test draws at NFE 10,
# 2,048 draws, half of them mined from 16,384, took UniPC-3's RMSE from 0.180 to 0.069 on
# random-32d (benchmarks/RESULTS.md). The oracle is cheap; an image model may take fewer.
CALIBRATION = Calibration(num_samples=2048, mining=8, dtype=torch.float64)
# Mining and the larger set only up to this NFE; above it the previous 256 plain draws: on 64d at
# NFE 50 both 2,048 mined and 2,048 plain draws gave schedules worse than the best peer's Karras
# (1.42e-03 against 7.76e-04 from 256 draws). A calibration the caller set is used as given.
MINED_UP_TO_NFE = 10
FAMILIES = ("diffusekit", "diffusers", "k-diffusion")
SW_DIRECTIONS = 64


# ---------------------------------------------------------------------------------------------
# Inputs: mixtures and method specs
# ---------------------------------------------------------------------------------------------


def _ring_2d() -> GaussianMixture:
    """Eight modes on a ring of radius 2, alternately sharp (std 0.05) and broad, anisotropic
    (0.3 x 0.12), with unequal weights, plus a broad centre mode."""
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    means = torch.cat([2 * torch.stack([angles.cos(), angles.sin()], 1), torch.zeros(1, 2, dtype=torch.float64)])
    stds = [[0.05, 0.05] if k % 2 == 0 else [0.3, 0.12] for k in range(8)] + [[0.5, 0.5]]
    weights = [1.0 + (k % 3) for k in range(8)] + [2.0]
    return GaussianMixture(means, stds, weights)


BUILTIN_MIXTURES: dict[str, Callable[[], GaussianMixture]] = {
    "2d": _ring_2d,
    "64d": lambda: GaussianMixture.random(64, 8, seed=1),
}


def load_mixture(spec: str) -> tuple[str, GaussianMixture]:
    """`2d`, `64d`, `random:DIM:COMPONENTS:SEED` (GaussianMixture.random) or a JSON spec file."""
    if spec in BUILTIN_MIXTURES:
        return spec, BUILTIN_MIXTURES[spec]()
    if spec.startswith("random:"):
        parts = spec.split(":")[1:]
        try:
            dim, k, seed = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"bad mixture {spec!r}; expected random:DIM:COMPONENTS:SEED, e.g. random:16:5:3") from None
        if dim < 1 or k < 1:
            raise ValueError(f"bad mixture {spec!r}: DIM and COMPONENTS must be >= 1")
        return f"random-{dim}d-{k}k-s{seed}", GaussianMixture.random(dim, k, seed=seed)
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"unknown mixture {spec!r}; valid: {', '.join(BUILTIN_MIXTURES)}, "
                         "random:DIM:COMPONENTS:SEED, or a JSON file with means/stds/weights")
    return path.stem, GaussianMixture.from_json(path)


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_spec(text: str) -> tuple[str, dict]:
    """`name` or `name:key=value,key=value` (e.g. `unipc:order=3`, `karras:rho=5`)."""
    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"bad option {item!r} in {text!r}; write name:key=value,key=value")
        options[key.strip()] = _value(value.strip())
    return name.strip(), options


def _check_samplers(specs, what="sampler") -> list[tuple[str, str, dict]]:
    out = []
    for spec in specs:
        name, options = parse_spec(spec)
        if name not in SAMPLERS or SAMPLERS[name].nfe(3) is None:
            valid = sorted(n for n, s in SAMPLERS.items() if s.nfe(3) is not None)
            raise ValueError(f"unknown {what} {name!r}; valid (fixed NFE): {', '.join(valid)}")
        out.append((spec, name, options))
    return out


def _check_spacings(specs) -> list[tuple[str, str, dict]]:
    out = []
    for spec in specs:
        name, options = parse_spec(spec)
        if name not in ALL_SPACINGS:
            raise ValueError(f"unknown spacing {name!r}; valid: {', '.join(ALL_SPACINGS)}")
        out.append((spec, name, options))
    return out


def _deterministic(name: str, options: dict) -> bool:
    return not SAMPLERS[name].stochastic or options.get("eta", 1.0) == 0


# ---------------------------------------------------------------------------------------------
# Cases, metrics, counting
# ---------------------------------------------------------------------------------------------


class CountingNetwork(nn.Module):
    """Counts forward calls (model evaluations) of the wrapped network."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network, self.calls = network, 0

    def forward(self, x, t, **cond):
        self.calls += 1
        return self.network(x, t, **cond)


@dataclass
class Case:
    name: str
    mixture: GaussianMixture
    schedule: NoiseSchedule
    x_T: Tensor  # VP noise [B, D]
    reference: Tensor  # exact ODE endpoints from x_T
    true_samples: Tensor
    directions: Tensor
    ref_nll: float
    floor_sw: float

    def counting_network(self) -> CountingNetwork:
        return CountingNetwork(self.mixture.eps_network(self.schedule))

    def denoiser(self, network=None) -> Denoiser:
        network = network if network is not None else self.mixture.eps_network(self.schedule)
        return Denoiser(network, self.schedule, "eps")


def sliced_wasserstein(a: Tensor, b: Tensor, directions: Tensor) -> float:
    """Mean over directions of the 1-D Wasserstein-1 distance between the projections (equal counts)."""
    pa = (a.double() @ directions.T).sort(0).values
    pb = (b.double() @ directions.T).sort(0).values
    return float((pa - pb).abs().mean())


def build_case(name: str, mixture: GaussianMixture, schedule: NoiseSchedule, samples: int, seed: int) -> Case:
    dim = mixture.dim
    gens = seeded_generators(seed, samples)
    x_T = torch.stack([torch.randn(dim, generator=g, dtype=torch.float64) for g in gens])
    sigma_max = schedule.sigma_max
    reference = mixture.ode_solve(x_T * math.sqrt(1 + sigma_max**2), sigma_max)
    g = torch.Generator().manual_seed(seed + 1)
    true_samples = mixture.sample(samples, generator=g)
    directions = torch.randn(SW_DIRECTIONS, dim, generator=g, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    ref_nll = float(-mixture.log_prob(reference).mean())
    return Case(name, mixture, schedule, x_T, reference, true_samples, directions, ref_nll,
                sliced_wasserstein(reference, true_samples, directions))


@dataclass
class Result:
    mixture: str
    family: str
    method: str
    schedule: str
    nfe: int
    steps: int | None
    rmse: float | None  # None for stochastic methods
    nll_gap: float
    sw: float
    seconds: float
    note: str = ""
    # per-sample mean squared error against the exact endpoints (deterministic methods); not in the CSV
    sample_errors: Tensor | None = field(default=None, repr=False)


def _score(case: Case, x: Tensor, deterministic: bool) -> tuple[float | None, float, float, Tensor | None]:
    """RMSE, NLL gap, SW and the per-sample squared errors (None for stochastic methods)."""
    x = x.double()
    if not torch.isfinite(x).all():
        return (math.nan if deterministic else None), math.nan, math.nan, None
    errors = ((x - case.reference) ** 2).flatten(1).mean(1) if deterministic else None
    rmse = float(errors.mean().sqrt()) if deterministic else None
    nll_gap = float(-case.mixture.log_prob(x).mean()) - case.ref_nll
    return rmse, nll_gap, sliced_wasserstein(x, case.true_samples, case.directions), errors


def _probe_nfe(run: Callable[[int], int], nfe: int, cache: dict, key) -> tuple[int | None, str]:
    """The number of steps n whose counted NFE is exactly `nfe` (None and what it does get)."""
    counts = cache.setdefault(key, {})
    for n in range(1, nfe + 2):
        if n not in counts:
            try:
                counts[n] = run(n)
            except Exception as e:  # a peer that refuses this step count
                counts[n] = -1
                counts.setdefault("error", f"{type(e).__name__}: {e}")
        if counts[n] == nfe:
            return n, ""
        if counts[n] > nfe:
            break
    got = {n: c for n, c in counts.items() if isinstance(n, int) and c > 0}
    near = sorted(got.items(), key=lambda kv: abs(kv[1] - nfe))[:2]
    near = ", ".join(f"NFE {c} with {n} steps" for n, c in sorted(near)) or counts.get("error", "no valid step count")
    return None, f"cannot meet NFE {nfe} ({near})"


# ---------------------------------------------------------------------------------------------
# diffusekit
# ---------------------------------------------------------------------------------------------


def _our_nfe(name: str, options: dict) -> Callable[[int], int]:
    """Counted NFE of sampler `name` for n steps, on a 1-sample zero denoiser."""

    def run(n: int) -> int:
        calls = [0]

        def zero(x, sigma, **cond):
            calls[0] += 1
            return torch.zeros_like(x)

        sigmas = NoiseSchedule.continuous(0.01, 100.0).get_sigmas(n)
        sample(zero, torch.ones(1, 1, dtype=torch.float64), sigmas, name, generator=torch.Generator().manual_seed(0),
               **options)
        return calls[0]

    return run


def run_ours(case: Case, sampler: tuple[str, str, dict], spacing: tuple[str, str, dict], nfe: int, *,
             seed: int, calibration: Calibration, nfe_cache: dict, log=print) -> Result:
    label, name, options = sampler
    spacing_label, spacing_name, spacing_options = spacing
    deterministic = _deterministic(name, options)
    n, why = _probe_nfe(_our_nfe(name, options), nfe, nfe_cache, ("ours", label))
    if n is None:
        return Result(case.name, "diffusekit", label, spacing_label, nfe, None, None, math.nan, math.nan, 0.0, why)
    note = ""
    start = time.perf_counter()
    if spacing_name == "optimised":
        info = {}
        sigmas = case.schedule.get_sigmas(n, "optimised", denoiser=case.denoiser(), sample_shape=(case.mixture.dim,),
                                          solver=name, solver_options=options, seed=seed,
                                          calibration=calibration if nfe <= MINED_UP_TO_NFE or calibration != CALIBRATION
                                          else replace(calibration, mining=0, num_samples=256), info=info)
        note = (f"calibration {info['model_calls']} evals x {calibration.num_samples} samples "
                f"({time.perf_counter() - start:.1f}s), base {info['base']}")
    else:
        sigmas = case.schedule.get_sigmas(n, spacing_name, **spacing_options)
    generator = None if deterministic else seeded_generators(seed + 7919, len(case.x_T))
    return _run_ours_on(case, label, spacing_label, nfe, n, sigmas, name, options, generator, note)


def _run_ours_on(case: Case, label: str, schedule_label: str, nfe: int, steps: int, sigmas: Tensor, name: str,
                 options: dict, generator, note: str) -> Result:
    """Run sampler `name` from the case's noise on `sigmas`, check its counted NFE, and score it."""
    start = time.perf_counter()
    network = case.counting_network()
    x = case.x_T * math.sqrt(1 + float(sigmas[0]) ** 2)
    out = sample(case.denoiser(network), x, sigmas, name, generator=generator, **options)
    seconds = time.perf_counter() - start
    if network.calls != nfe:
        raise RuntimeError(f"{label} took {network.calls} model evaluations, expected {nfe}")
    rmse, nll_gap, sw, errors = _score(case, out, generator is None)
    return Result(case.name, "diffusekit", label, schedule_label, nfe, steps, rmse, nll_gap, sw, seconds, note, errors)


def run_fitted(case: Case, nfe: int, *, seed: int, settings: SolverFit) -> Result:
    """The `fitted` sampler with levels and coefficients fitted to this mixture's model for `nfe`
    evaluations (`schedule_opt.fit_solver`, its own calibration noise, never the bench's)."""
    start = time.perf_counter()
    info: dict = {}
    sigmas, coefficients = fit_solver(case.denoiser(), nfe, sigma_min=case.schedule.sigma_min,
                                      sigma_max=case.schedule.sigma_max, sample_shape=(case.mixture.dim,),
                                      variance_preserving=True, seed=seed, settings=settings,
                                      schedule=case.schedule, info=info)
    note = (f"fit {info['model_calls']} evals x <= {settings.num_samples} samples "
            f"({time.perf_counter() - start:.0f}s), held-out RMSE {math.sqrt(info['validation_mse_start']):.3g} "
            f"(UniPC-3, {info['start']}) -> {math.sqrt(info['validation_mse']):.3g}")
    return _run_ours_on(case, "fitted", "fitted", nfe, nfe, sigmas, "fitted", {"coefficients": coefficients}, None, note)


# ---------------------------------------------------------------------------------------------
# Peers (lazy imports; test/bench-only dependencies)
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_peers():
    """Silence the peers' deprecation warnings and diffusers' config notices while they run."""
    diffusers = _import_diffusers()
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)


def _import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ValueError("--peers needs diffusers: pip install diffusers (a test/bench-only dependency)") from None
    return diffusers


def load_k_diffusion_sampling():
    """k-diffusion's `sampling` module, loaded alone: `import k_diffusion` imports every submodule,
    and its `utils` imports torchvision (a CUDA build from PyPI that fails beside the CPU torch),
    so the file `k_diffusion/sampling.py` is loaded with a `utils` holding the one helper it uses."""
    import importlib.util
    import sys
    import types

    if "_k_diffusion_bench.sampling" in sys.modules:
        return sys.modules["_k_diffusion_bench.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    missing = [m for m in ("scipy", "torchsde", "torchdiffeq") if importlib.util.find_spec(m) is None]
    if spec is None or not spec.submodule_search_locations or missing:
        raise ValueError("--peers needs k-diffusion: pip install --no-deps k-diffusion scipy torchsde torchdiffeq"
                         + (f" (missing: {', '.join(missing)})" if missing else ""))
    package = types.ModuleType("_k_diffusion_bench")
    package.__path__ = []
    utils = types.ModuleType("_k_diffusion_bench.utils")
    utils.append_dims = lambda x, target_dims: x[(...,) + (None,) * (target_dims - x.ndim)]
    package.utils = utils
    sys.modules["_k_diffusion_bench"], sys.modules["_k_diffusion_bench.utils"] = package, utils
    path = Path(spec.submodule_search_locations[0]) / "sampling.py"
    file_spec = importlib.util.spec_from_file_location("_k_diffusion_bench.sampling", path)
    module = importlib.util.module_from_spec(file_spec)
    sys.modules["_k_diffusion_bench.sampling"] = module
    file_spec.loader.exec_module(module)
    return module


# (label, class, config) for diffusers; every variant also gets each timestep spacing and sigma
# option the class offers. UniPC's bh1 is left out: with the default final sigma 0 its last step is
# NaN (B(h) = -inf times 0); so is the deprecated noise-prediction DPM-Solver, which refuses a final 0.
DIFFUSERS_SCHEDULERS = (
    ("Euler", "EulerDiscreteScheduler", {}),
    ("Heun", "HeunDiscreteScheduler", {}),
    ("LMS", "LMSDiscreteScheduler", {}),
    ("KDPM2", "KDPM2DiscreteScheduler", {}),
    ("DDIM", "DDIMScheduler", {"clip_sample": False}),
    ("PNDM", "PNDMScheduler", {}),
    ("PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
    ("DPM++2M", "DPMSolverMultistepScheduler", {"solver_order": 2}),
    ("DPM++2M-heun", "DPMSolverMultistepScheduler", {"solver_order": 2, "solver_type": "heun"}),
    ("DPM++3M", "DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("DPM++2S", "DPMSolverSinglestepScheduler", {"solver_order": 2}),
    ("DPM++3S", "DPMSolverSinglestepScheduler", {"solver_order": 3}),
    ("UniPC-2", "UniPCMultistepScheduler", {"solver_order": 2}),
    ("UniPC-3", "UniPCMultistepScheduler", {"solver_order": 3}),
    ("DEIS-2", "DEISMultistepScheduler", {"solver_order": 2}),
    ("DEIS-3", "DEISMultistepScheduler", {"solver_order": 3}),
)
DIFFUSERS_SIGMA_OPTIONS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas",
                           "beta": "use_beta_sigmas", "lu": "use_lu_lambdas"}
DIFFUSERS_BETAS = {"linear": ("linear", 1e-4, 0.02), "scaled_linear": ("scaled_linear", 0.00085, 0.012)}


def diffusers_variants() -> list[tuple[str, str, str, dict]]:
    """(method, schedule label, class name, config) for every peer run from diffusers."""
    diffusers = _import_diffusers()
    variants = []
    for label, cls_name, config in DIFFUSERS_SCHEDULERS:
        params = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
        spacings = ("linspace", "leading", "trailing") if "timestep_spacing" in params else (None,)
        for spacing in spacings:
            extra = {} if spacing is None else {"timestep_spacing": spacing}
            variants.append((label, spacing or "default", cls_name, {**config, **extra}))
        for option, param in DIFFUSERS_SIGMA_OPTIONS.items():
            if param in params:
                variants.append((label, option, cls_name, {**config, param: True}))
    return variants


def _diffusers_scheduler(case: Case, cls_name: str, config: dict):
    diffusers = _import_diffusers()
    if case.schedule.name not in DIFFUSERS_BETAS:
        raise ValueError(f"peers need a linear or scaled_linear schedule, got {case.schedule.name!r}")
    beta_schedule, beta_start, beta_end = DIFFUSERS_BETAS[case.schedule.name]
    return getattr(diffusers, cls_name)(num_train_timesteps=case.schedule.num_steps, beta_schedule=beta_schedule,
                                        beta_start=beta_start, beta_end=beta_end, **config)


def run_diffusers(case: Case, variant: tuple[str, str, str, dict], nfe: int, nfe_cache: dict) -> Result:
    label, schedule_label, cls_name, config = variant
    try:
        probe = _diffusers_scheduler(case, cls_name, config)
    except ValueError as e:  # a configuration this diffusers refuses
        return Result(case.name, "diffusers", label, schedule_label, nfe, None, None, math.nan, math.nan, 0.0,
                      f"refused by diffusers: {e}")

    def count(n: int) -> int:
        probe.set_timesteps(n)
        return len(probe.timesteps)

    n, why = _probe_nfe(count, nfe, nfe_cache, ("diffusers", label, schedule_label))
    if n is None:
        return Result(case.name, "diffusers", label, schedule_label, nfe, None, None, math.nan, math.nan, 0.0, why)
    start = time.perf_counter()
    scheduler = _diffusers_scheduler(case, cls_name, config)
    scheduler.set_timesteps(n)
    network = case.counting_network()
    x = case.x_T * float(scheduler.init_noise_sigma)
    batch = len(x)
    try:
        for t in scheduler.timesteps:
            eps = network(scheduler.scale_model_input(x, t), torch.as_tensor(t).double().expand(batch))
            x = scheduler.step(eps, t, x).prev_sample
        note = ""
    except Exception as e:  # report a peer's failure as a row, do not stop the bench
        x, note = torch.full_like(x, math.nan), f"failed: {type(e).__name__}: {e}"
    seconds = time.perf_counter() - start
    if network.calls != nfe and not note:
        note = f"counted {network.calls} model evaluations"
    rmse, nll_gap, sw, errors = _score(case, x, True)
    return Result(case.name, "diffusers", label, schedule_label, nfe, n, rmse, nll_gap, sw, seconds, note, errors)


# (label, k-diffusion function, options); dpm_fast is run separately (its own log-SNR-uniform steps).
K_SAMPLERS = (
    ("euler", "sample_euler", {}),
    ("heun", "sample_heun", {}),
    ("dpm_2", "sample_dpm_2", {}),
    ("lms", "sample_lms", {}),
    ("dpmpp_2m", "sample_dpmpp_2m", {}),
    ("dpmpp_2s(eta=0)", "sample_dpmpp_2s_ancestral", {"eta": 0.0}),
    ("dpmpp_sde(eta=0)", "sample_dpmpp_sde", {"eta": 0.0}),
    ("dpmpp_2m_sde(eta=0,heun)", "sample_dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}),
    ("dpmpp_3m_sde(eta=0)", "sample_dpmpp_3m_sde", {"eta": 0.0}),
)
K_SCHEDULES = ("karras", "exponential", "polyexponential(rho=2)", "vp", "discrete")


def _k_sigmas(ks, schedule_label: str, n: int, schedule: NoiseSchedule) -> Tensor:
    lo, hi = schedule.sigma_min, schedule.sigma_max
    if schedule_label == "karras":
        sigmas = ks.get_sigmas_karras(n, lo, hi)
    elif schedule_label == "exponential":
        sigmas = ks.get_sigmas_exponential(n, lo, hi)
    elif schedule_label == "polyexponential(rho=2)":
        sigmas = ks.get_sigmas_polyexponential(n, lo, hi, rho=2.0)
    elif schedule_label == "vp":
        sigmas = ks.get_sigmas_vp(n)
    else:  # DiscreteSchedule.get_sigmas: timesteps evenly from T - 1 to 0
        sigmas = schedule.t_to_sigma(torch.linspace(schedule.num_steps - 1, 0, n, dtype=torch.float64))
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.double()


def run_k_diffusion(case: Case, variant: tuple[str, str, dict, str], nfe: int, nfe_cache: dict) -> Result:
    ks = load_k_diffusion_sampling()
    label, fn_name, options, schedule_label = variant
    fn = getattr(ks, fn_name)

    def count(n: int) -> int:
        calls = [0]

        def zero(x, sigma, **kw):
            calls[0] += 1
            return torch.zeros_like(x)

        if fn_name == "sample_dpm_fast":
            fn(zero, torch.ones(1, 1, dtype=torch.float64), case.schedule.sigma_min, case.schedule.sigma_max, n,
               disable=True)
        else:
            fn(zero, torch.ones(1, 1, dtype=torch.float64), _k_sigmas(ks, schedule_label, n, case.schedule),
               disable=True, **options)
        return calls[0]

    n, why = _probe_nfe(count, nfe, nfe_cache, ("k", label, schedule_label))
    if n is None:
        return Result(case.name, "k-diffusion", label, schedule_label, nfe, None, None, math.nan, math.nan, 0.0, why)
    start = time.perf_counter()
    network = case.counting_network()
    denoiser = case.denoiser(network)
    if fn_name == "sample_dpm_fast":
        x = case.x_T * math.sqrt(1 + case.schedule.sigma_max**2)
        out = fn(denoiser, x, case.schedule.sigma_min, case.schedule.sigma_max, n, disable=True)
    else:
        sigmas = _k_sigmas(ks, schedule_label, n, case.schedule)
        x = case.x_T * math.sqrt(1 + float(sigmas[0]) ** 2)
        out = fn(denoiser, x, sigmas, disable=True, **options)
    seconds = time.perf_counter() - start
    note = "" if network.calls == nfe else f"counted {network.calls} model evaluations"
    rmse, nll_gap, sw, errors = _score(case, out, True)
    return Result(case.name, "k-diffusion", label, schedule_label, nfe, n, rmse, nll_gap, sw, seconds, note, errors)


def k_diffusion_variants() -> list[tuple[str, str, dict, str]]:
    variants = [(label, fn, options, sched) for label, fn, options in K_SAMPLERS for sched in K_SCHEDULES]
    return variants + [("dpm_fast", "sample_dpm_fast", {}, "own (log-SNR uniform, ends at sigma_min)")]


# ---------------------------------------------------------------------------------------------
# The run, the table, the CSV and the plot
# ---------------------------------------------------------------------------------------------


def _fmt(value, spec=".2e") -> str:
    if value is None:
        return "-"
    return "nan" if not math.isfinite(value) else format(value, spec)


def best(results: list[Result], mixture: str, nfe: int, families) -> Result | None:
    rows = [r for r in results if r.mixture == mixture and r.nfe == nfe and r.family in families
            and r.rmse is not None and math.isfinite(r.rmse)]
    return min(rows, key=lambda r: r.rmse) if rows else None


def ratio_lines(results: list[Result], mixture: str, nfes) -> list[str]:
    lines = []
    for nfe in nfes:
        ours = best(results, mixture, nfe, ("diffusekit",))
        peer = best(results, mixture, nfe, ("diffusers", "k-diffusion"))
        if ours is None or peer is None:
            lines.append(f"  NFE {nfe:>3}: ratio n/a")
            continue
        low, high = ratio_interval(ours.sample_errors, peer.sample_errors)
        lines.append(f"  NFE {nfe:>3}: ratio best diffusekit / best peer RMSE = {ours.rmse / peer.rmse:.3f} "
                     f"(90% bootstrap {low:.2f}-{high:.2f})   [{ours.method} + {ours.schedule} {ours.rmse:.2e} vs "
                     f"{peer.family} {peer.method} ({peer.schedule}) {peer.rmse:.2e}]")
    return lines


def ratio_interval(ours: Tensor | None, peer: Tensor | None, *, draws: int = 2000, level: float = 0.9,
                   seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap interval of RMSE(ours) / RMSE(peer) from per-sample squared errors on the
    same noise. At 5-10 NFE a few samples that change mode carry most of the error, so a ratio from
    a few hundred samples is uncertain by tens of percent; this says by how much."""
    if ours is None or peer is None or len(ours) != len(peer) or len(ours) == 0:
        return math.nan, math.nan
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(ours), (draws, len(ours)), generator=g)
    ratios = (ours.double()[pick].mean(1) / peer.double()[pick].mean(1)).sqrt()
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(ratios, q).tolist()
    return low, high


def format_table(results: list[Result], case: Case, nfes, top: int) -> str:
    lines = [f"{'NFE':>4}  {'family':<11} {'method':<26} {'schedule':<24} {'steps':>5} {'RMSE':>9} "
             f"{'NLL gap':>9} {'SW':>9}"]
    for nfe in nfes:
        for family in FAMILIES:
            rows = [r for r in results if r.mixture == case.name and r.nfe == nfe and r.family == family
                    and r.steps is not None]
            det = sorted((r for r in rows if r.rmse is not None), key=lambda r: (not math.isfinite(r.rmse), r.rmse))
            sto = sorted((r for r in rows if r.rmse is None), key=lambda r: (not math.isfinite(r.sw), r.sw))
            for r in det[:top] + sto[:1]:
                lines.append(f"{nfe:>4}  {family:<11} {r.method[:26]:<26} {r.schedule[:24]:<24} {r.steps:>5} "
                             f"{_fmt(r.rmse):>9} {_fmt(r.nll_gap, '+.2e'):>9} {_fmt(r.sw):>9}")
    return "\n".join(lines)


def write_csv(results: list[Result], path: Path) -> None:
    """Every row but the per-sample errors, written atomically."""
    columns = [name for name in Result.__dataclass_fields__ if name != "sample_errors"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in results:
            writer.writerow({name: getattr(r, name) for name in columns})


PALETTE = ((214, 39, 40), (148, 103, 189), (31, 119, 180), (44, 160, 44), (255, 127, 14), (23, 190, 207))


def plot_series(panels: list[tuple[str, dict[str, list[tuple[float, float]]]]], path: Path,
                panel_size=(460, 360)) -> None:
    """A small multi-series log-log plot with PIL: one panel per (title, {series: [(x, y), ...]})."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = panel_size
    image = Image.new("RGB", (width * max(len(panels), 1), height + 90), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    names = sorted({name for _, series in panels for name in series}, key=lambda s: list(
        dict.fromkeys(n for _, series in panels for n in series)).index(s))
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    for p, (title, series) in enumerate(panels):
        x0 = p * width
        left, right, top, bottom = x0 + 62, x0 + width - 15, 28, height - 30
        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, 8), title, fill="black", font=font)
        points = [(x, y) for pts in series.values() for x, y in pts if x > 0 and y > 0 and math.isfinite(y)]
        if not points:
            continue
        lx = [math.log10(x) for x, _ in points]
        ly = [math.log10(y) for _, y in points]
        xlo, xhi = min(lx), max(max(lx), min(lx) + 1e-9)
        ylo, yhi = math.floor(min(ly)), max(math.ceil(max(ly)), math.floor(min(ly)) + 1)

        def to_px(x, y):
            return (left + (math.log10(x) - xlo) / (xhi - xlo) * (right - left),
                    bottom - (math.log10(y) - ylo) / (yhi - ylo) * (bottom - top))

        for e in range(int(ylo), int(yhi) + 1):
            y = bottom - (e - ylo) / (yhi - ylo) * (bottom - top)
            draw.line([(left, y), (right, y)], fill=(225, 225, 225))
            draw.text((x0 + 8, y - 6), f"1e{e}", fill="black", font=font)
        for x in sorted({x for x, _ in points}):
            px, _ = to_px(x, 10**ylo)
            draw.line([(px, top), (px, bottom)], fill=(235, 235, 235))
            draw.text((px - 6, bottom + 6), f"{x:g}", fill="black", font=font)
        draw.text((right - 60, bottom + 18), "NFE", fill="black", font=font)
        draw.text((x0 + 8, top - 18 + 4), "RMSE", fill="black", font=font)
        for name, pts in series.items():
            pts = sorted((x, y) for x, y in pts if x > 0 and y > 0 and math.isfinite(y))
            px = [to_px(x, y) for x, y in pts]
            if len(px) > 1:
                draw.line(px, fill=colors[name], width=2)
            for cx, cy in px:
                draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colors[name])
    for i, name in enumerate(names):
        y = height + 10 + 16 * (i % 4)
        x = 20 + 330 * (i // 4)
        draw.line([(x, y + 6), (x + 24, y + 6)], fill=colors[name], width=3)
        draw.text((x + 30, y), name, fill="black", font=font)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _plot(results: list[Result], cases: list[Case], nfes, path: Path) -> None:
    panels = []
    for case in cases:
        series = {}
        for label, families, keep in (
            ("diffusekit, best", ("diffusekit",), lambda r: True),
            ("diffusekit, best built-in schedule", ("diffusekit",), lambda r: r.schedule not in ("optimised", "fitted")),
            ("diffusers, best", ("diffusers",), lambda r: True),
            ("k-diffusion, best", ("k-diffusion",), lambda r: True),
        ):
            pts = []
            for nfe in nfes:
                rows = [r for r in results if r.mixture == case.name and r.nfe == nfe and r.family in families
                        and r.rmse is not None and math.isfinite(r.rmse) and keep(r)]
                if rows:
                    pts.append((nfe, min(r.rmse for r in rows)))
            if pts:
                series[label] = pts
        panels.append((f"{case.name} ({case.mixture.dim}-D, {case.mixture.num_components} modes)", series))
    plot_series(panels, path)


def run(*, mixtures=DEFAULT_MIXTURES, schedule: str = "linear", nfes=NFES, samples: int = 512,
        samplers=DEFAULT_SAMPLERS, spacings=DEFAULT_SPACINGS, opt_samplers=DEFAULT_OPT_SAMPLERS,
        peers: bool | list[str] = False, out_dir="bench-samplers", seed: int = 0, top: int = 3,
        calibration: Calibration | None = None, fit_nfes=None, fit: SolverFit | None = None,
        log=print) -> list[Result]:
    """Run the benchmark, print the table and ratios through `log`, write samplers.csv and
    samplers.png into `out_dir`; returns every result row. `peers`: True for every peer, or the
    peer method names to run (diffusers labels such as "DPM++2M", k-diffusion ones such as "lms").
    `fit_nfes`: the budgets (among `nfes`) at which the fitted solver is also run, with `fit`'s
    settings; None: those of DEFAULT_FIT_NFES that are among `nfes`."""
    nfes = sorted({int(n) for n in nfes})
    if not nfes or nfes[0] < 1:
        raise ValueError(f"NFE values must be positive integers, got {nfes}")
    if samples < 2:
        raise ValueError(f"--samples must be >= 2, got {samples}")
    sampler_specs = _check_samplers(samplers)
    spacing_specs = _check_spacings(spacings)
    opt_specs = {label for label, _, _ in _check_samplers(opt_samplers, "sampler for the optimised schedule")}
    for label in opt_specs:
        if label not in {spec for spec, _, _ in sampler_specs}:
            raise ValueError(f"--opt-samplers {label!r} is not among the samplers run ({', '.join(samplers)})")
        name, options = parse_spec(label)
        if not _deterministic(name, options):
            raise ValueError(f"the optimised schedule needs a deterministic sampler; {label!r} is stochastic "
                             "(add eta=0)")
    if schedule not in DIFFUSERS_BETAS:
        raise ValueError(f"unknown model schedule {schedule!r}; valid: {', '.join(DIFFUSERS_BETAS)}")
    peer_names = None if isinstance(peers, bool) else set(peers)
    if peers:  # fail early, with the one-line reason, before any work
        _import_diffusers()
        load_k_diffusion_sampling()
        valid = [label for label, _, _ in DIFFUSERS_SCHEDULERS] + [v[0] for v in k_diffusion_variants()]
        if peer_names is not None and not peer_names <= set(valid):
            unknown = ", ".join(sorted(peer_names - set(valid)))
            raise ValueError(f"unknown peer {unknown}; valid: {', '.join(dict.fromkeys(valid))}")
        d_variants = [v for v in diffusers_variants() if peer_names is None or v[0] in peer_names]
        k_variants = [v for v in k_diffusion_variants() if peer_names is None or v[0] in peer_names]
    calibration = calibration or CALIBRATION
    calibration.check()
    fit = fit or SolverFit(dtype=torch.float64)
    fit.check()
    fit_nfes = set(DEFAULT_FIT_NFES) & set(nfes) if fit_nfes is None else {int(n) for n in fit_nfes}
    if not fit_nfes <= set(nfes):
        raise ValueError(f"--fit-nfe {sorted(fit_nfes - set(nfes))} is not among the NFE values run ({nfes})")
    sched = NoiseSchedule.from_name(schedule)
    loaded = [load_mixture(spec) for spec in mixtures]
    out_dir = Path(out_dir)
    results: list[Result] = []
    cases = []
    log(f"diffusekit bench samplers: discrete VP eps model ({schedule}, T={sched.num_steps}, sigma "
        f"{sched.sigma_min:.4g}..{sched.sigma_max:.4g}), {samples} samples per mixture, NFE {nfes}, "
        f"torch threads {torch.get_num_threads()}, seed {seed}")
    for name, mixture in loaded:
        t0 = time.perf_counter()
        case = build_case(name, mixture, sched, samples, seed)
        cases.append(case)
        nfe_cache: dict = {}
        skipped: dict[tuple[str, str], dict[int, str]] = {}  # (family, method) -> {NFE: reason}
        for nfe in nfes:
            for sampler in sampler_specs:
                for spacing in spacing_specs:
                    if spacing[1] == "optimised" and sampler[0] not in opt_specs:
                        continue
                    r = run_ours(case, sampler, spacing, nfe, seed=seed, calibration=calibration, nfe_cache=nfe_cache)
                    results.append(r)
                    if r.steps is None:
                        skipped.setdefault((r.family, r.method), {}).setdefault(nfe, r.note)
            if nfe in fit_nfes:
                results.append(run_fitted(case, nfe, seed=seed, settings=fit))
            if peers:
                with _quiet_peers():
                    peer_rows = [run_diffusers(case, v, nfe, nfe_cache) for v in d_variants]
                    peer_rows += [run_k_diffusion(case, v, nfe, nfe_cache) for v in k_variants]
                for r in peer_rows:
                    results.append(r)
                    if r.steps is None:
                        skipped.setdefault((r.family, r.method), {}).setdefault(nfe, r.note)
        log("")
        log(f"== {name}: {mixture.dim}-D, {mixture.num_components} components "
            f"(exact endpoints: SW floor {case.floor_sw:.2e}; {time.perf_counter() - t0:.0f}s)")
        log(format_table(results, case, nfes, top))
        for (family, method), reasons in skipped.items():
            first = min(reasons)
            log(f"  skipped {family} {method} at NFE {', '.join(map(str, sorted(reasons)))}: {reasons[first]}"
                + (" ..." if len(reasons) > 1 else ""))
        for r in results:
            if r.mixture == name and r.schedule in ("optimised", "fitted") and r.steps is not None:
                log(f"  {r.schedule} {'solver' if r.schedule == 'fitted' else 'schedule for ' + r.method} "
                    f"at NFE {r.nfe}: {r.note}")
        if peers:
            log(f"ratios ({name}):")
            for line in ratio_lines(results, name, nfes):
                log(line)
    if peers and len(cases) > 1:
        log("")
        log("summary: best diffusekit / best peer RMSE")
        log(f"{'mixture':<24}" + "".join(f"{'NFE ' + str(n):>10}" for n in nfes))
        for case in cases:
            cells = []
            for nfe in nfes:
                ours = best(results, case.name, nfe, ("diffusekit",))
                peer = best(results, case.name, nfe, ("diffusers", "k-diffusion"))
                cells.append(f"{ours.rmse / peer.rmse:>10.3f}" if ours and peer else f"{'n/a':>10}")
            log(f"{case.name:<24}" + "".join(cells))
    write_csv(results, out_dir / "samplers.csv")
    _plot(results, cases, nfes, out_dir / "samplers.png")
    log(f"wrote {out_dir / 'samplers.csv'} and {out_dir / 'samplers.png'}")
    return results
