"""Sigma schedules optimised for one model and one solver, from the model alone.

Method: direct minimisation of the solver's endpoint error on a calibration set of the model's own
probability-flow trajectories.

1. Calibration noise: `num_samples` draws x_T ~ N(0, I) from `seed`, started at sigma_max
   (scaled by sqrt(1 + sigma_max^2) for a variance-preserving model, by sigma_max otherwise).
2. Reference endpoints, with the model: UniPC-3 (bh2) on `reference_steps` noise levels, even
   in log sigma from sigma_max down to 1.25 sigma_min, then sigma_min. A model says nothing about
   noise levels below its sigma_min, and the step from sigma_min to 0 (x = D(x, sigma_min)) is the
   largest error of the usual samplers at high NFE (diffusers' DPM-Solver++ and UniPC lose most of
   their accuracy there). Along an ODE trajectory the denoiser's output is even in sigma,
   D(x(sigma), sigma) = x(0) + c sigma^2 + O(sigma^4) (for one Gaussian it is exactly a function of
   sigma^2), so the reference endpoint is the Richardson extrapolation of D in sigma^2 from the last
   two levels. On the oracle mixtures this cuts the error of the endpoint 30-100x below D(sigma_min).
3. Search: the schedule's nonzero levels are log sigma_i = b_i + d(i / (n - 1)). The base b is the
   best, on the calibration loss, of 42 standard shapes (Karras rho 3 and 7, polyexponential rho
   0.7, 1, 2, 3, uniform in t for discrete models) each ending at one of six last levels
   sigma_min (sigma_max / sigma_min)^f, f = 0, 0.1, ..., 0.5: with few steps the best last level is
   far above sigma_min (on multi-modal data the final x = D(x, sigma_last) is then a safe posterior
   mean), with many it is sigma_min. The offset d is piecewise linear through K = min(n - 1, 10)
   knots with d(0) = 0 (sigmas[0] stays sigma_max, where the noise lives; for n <= 11 every other
   level is free). The loss is the mean squared distance between the solver's output and the
   reference endpoints; a coordinate pattern search over the knots (with a parabolic step when a
   coordinate brackets its minimum) lowers it. Levels stay strictly descending inside
   [sigma_min, sigma_max], so a discrete model is never asked for a level outside its table.

NFE budget: every model evaluation is one batch of `num_samples` calibration samples. The
reference costs `reference_steps` evaluations; the base candidates and the search together run
the solver at most `max_runs` times, nfe(n) evaluations each (the solver's NFE for n steps).
`Calibration.max_model_calls(nfe)` is that bound: with the defaults (256 samples, 200 reference
steps, max_runs = min(200, max(60, 3000 // nfe))) at most 3,200 batched evaluations (1,200 at
NFE 5, 2,200 at NFE 10), i.e. at most about 820,000 single-sample evaluations.

What it cannot fix: on well-separated mixtures the error at 5-10 NFE is dominated by the few
samples that the solver sends to another mode than the exact flow does; the calibration loss sees
only a few of them, so part of its gain there is noise-fitting. More `num_samples` helps.

The result is a pure function of (denoiser, n, solver, solver options, calibration settings,
seed): nothing is cached between calls, and no data is looked at, only the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

MAX_KNOTS = 10
REFERENCE_SOLVER = ("unipc", {"order": 3})
EXTRAPOLATION_RATIO = 1.25  # the second-last reference level, in units of sigma_min
TRAJECTORY_STRIDE = 4  # fit_solver keeps every 4th reference state: linear interpolation in log sigma is then within ~3e-3


@dataclass(frozen=True)
class Calibration:
    """Budget and numerics of an optimised schedule (see the module docstring for the method).

    num_samples: calibration noise draws, evaluated as one batch per model evaluation.
    reference_steps: model evaluations of the reference solve.
    max_runs: solver runs (base candidates plus search); None: min(200, max(60, 3000 // nfe)).
    mining: 0, or the size of a pool of noise draws, as a multiple of `num_samples`, screened for
    the draws a low-NFE solver gets most wrong (`_mined_noise`): half the calibration draws are
    those, weighted so that the calibration error stays an unbiased mean over all noise. At 5-10
    evaluations the error is carried by the few draws in a thousand that a solver sends to another
    mode; a plain calibration set of a few hundred holds almost none of them, so the search tunes
    the levels for the easy draws alone. Costs `mining * 3 * nfe` batched evaluations more.
    dtype, device: of the calibration batch (float32 suits networks; the oracle may use float64).
    """

    num_samples: int = 256
    reference_steps: int = 200
    max_runs: int | None = None
    mining: int = 0
    dtype: torch.dtype = torch.float32
    device: str | torch.device = "cpu"

    def runs(self, nfe: int) -> int:
        return self.max_runs if self.max_runs is not None else min(200, max(60, 3000 // max(nfe, 1)))

    def max_model_calls(self, nfe: int) -> int:
        """The most batched model evaluations an optimisation whose solver takes `nfe` evaluations may use."""
        return self.reference_steps + (self.runs(nfe) + 3 * self.mining) * nfe

    def check(self) -> None:
        if not (isinstance(self.num_samples, int) and self.num_samples >= 1):
            raise ValueError(f"num_samples must be a positive integer, got {self.num_samples!r}")
        if not (isinstance(self.mining, int) and self.mining >= 0):
            raise ValueError(f"mining must be a non-negative integer, got {self.mining!r}")
        if self.mining and self.num_samples < 2:
            raise ValueError(f"mining needs num_samples >= 2 (half hard draws, half the rest), got {self.num_samples}")
        if not (isinstance(self.reference_steps, int) and self.reference_steps >= 8):
            raise ValueError(f"reference_steps must be an integer >= 8, got {self.reference_steps!r}")
        if self.max_runs is not None and not (isinstance(self.max_runs, int) and self.max_runs >= 1):
            raise ValueError(f"max_runs must be a positive integer or None, got {self.max_runs!r}")


class _Budget:
    """Counts solver runs and stops the search when they are spent."""

    def __init__(self, runs: int):
        self.left, self.used = runs, 0

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        self.used += 1
        return True


SHAPES = (("karras", 3.0), ("karras", 7.0), ("polyexponential", 0.7), ("polyexponential", 1.0),
          ("polyexponential", 2.0), ("polyexponential", 3.0), ("uniform", None))
END_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def _base_candidates(n: int, sigma_min: float, sigma_max: float, schedule) -> dict[str, np.ndarray]:
    """Log sigmas of standard shapes (Karras rho 3 and 7, polyexponential rho 0.7-3, uniform in t for
    discrete models) from sigma_max down to several last levels sigma_end = sigma_min
    (sigma_max / sigma_min)^f: with few steps the best last level is often far above sigma_min
    (the final x = D(x, sigma_end) is then a safe posterior mean)."""
    from .schedules import karras_sigmas, polyexponential_sigmas

    out = {}
    for f in END_FRACTIONS if n > 1 else (0.0,):
        end = sigma_min * (sigma_max / sigma_min) ** f
        for shape, rho in SHAPES:
            if shape == "karras":
                sigmas = karras_sigmas(n, end, sigma_max, rho)[:-1]
            elif shape == "polyexponential":
                sigmas = polyexponential_sigmas(n, end, sigma_max, rho)[:-1]
            elif schedule is not None and schedule.is_discrete:
                t_end = float(schedule.sigma_to_t(torch.tensor([end], dtype=torch.float64))[0])
                sigmas = schedule.t_to_sigma(torch.linspace(schedule.num_steps - 1, t_end, n, dtype=torch.float64))
            else:
                continue
            name = f"{shape}" + (f"(rho={rho:g})" if rho is not None else "") + f", end {end:.3g}"
            out[name] = sigmas.log().numpy()
    return out


def reference_endpoints(denoiser, x: Tensor, sigma_min: float, sigma_max: float, steps: int,
                        cond: dict | None = None, trajectory: list | None = None) -> Tensor:
    """The model's own ODE endpoints from x at sigma_max: UniPC-3 on `steps` levels to
    sigma_min, then Richardson extrapolation of the denoiser output in sigma^2 (module docstring).
    Costs exactly `steps` model evaluations. `trajectory`, a list, receives the states on the way,
    at every TRAJECTORY_STRIDE-th level (even in log sigma from sigma_max, the first one x itself),
    divided by sqrt(1 + sigma^2) (float32, to bound the memory)."""
    from .sampling import sample

    sigma_b = EXTRAPOLATION_RATIO * sigma_min
    if not sigma_max > sigma_b:
        raise ValueError(f"sigma range too narrow for the reference: need sigma_max > {EXTRAPOLATION_RATIO} sigma_min")
    upper = torch.linspace(math.log(sigma_max), math.log(sigma_b), steps - 1, dtype=torch.float64).exp()
    grid = torch.cat([upper, torch.tensor([sigma_min, 0.0], dtype=torch.float64)])
    outputs = {}

    if trajectory is not None:
        trajectory.append((x / math.sqrt(1 + sigma_max**2)).float())

    def keep(info):
        if trajectory is not None and (info["i"] + 1) % TRAJECTORY_STRIDE == 0 and info["i"] + 1 < steps - 1:
            trajectory.append((info["x"] / math.sqrt(1 + info["sigma_next"] ** 2)).float())
        if info["i"] >= steps - 2:
            outputs[info["i"]] = info["denoised"]

    name, options = REFERENCE_SOLVER
    sample(denoiser, x, grid, name, callback=keep, cond=cond, **options)
    d_b, d_a = outputs[steps - 2], outputs[steps - 1]
    return d_a + (d_a - d_b) * (sigma_min**2 / (sigma_b**2 - sigma_min**2))


def reference_state(trajectory: Tensor, sigma: Tensor, sigma_min: float, sigma_max: float, steps: int) -> Tensor:
    """The reference state at `sigma` of the draws of `trajectory` (`reference_endpoints`' states,
    stacked: [levels, draws, ...]), divided by sqrt(1 + sigma^2): linear in log sigma between the
    stored levels. Differentiable in `sigma`."""
    log_spacing = TRAJECTORY_STRIDE * (math.log(sigma_max) - math.log(EXTRAPOLATION_RATIO * sigma_min)) / (steps - 2)
    position = ((math.log(sigma_max) - sigma.log()) / log_spacing).clamp(0, len(trajectory) - 1 - 1e-6)
    k = int(position)
    frac = (position - k).to(trajectory.dtype)
    return trajectory[k] * (1 - frac) + trajectory[k + 1] * frac


def _per_draw_mse(out: Tensor, target: Tensor) -> Tensor:
    return ((out - target).double() ** 2).reshape(len(out), -1).mean(1)


def _weighted_mean(values: Tensor, draw_weights: Tensor | None) -> Tensor:
    """The mean of per-draw values, each draw counted by its weight (None: all equal)."""
    if draw_weights is None:
        return values.mean()
    return (values * draw_weights).sum() / draw_weights.sum()


@torch.no_grad()
def _endpoint_mse(denoiser, x: Tensor, target: Tensor, levels: Tensor, x_scale: Tensor, weights: Tensor,
                  cond: dict | None, basis: Tensor | None = None, draw_weights: Tensor | None = None) -> float:
    """Mean squared endpoint error of the linear multistep solver on `levels` (without the final 0),
    each draw counted by its weight in `draw_weights` (see `_mined_noise`)."""
    from .sampling.fitted import run_linear_multistep

    out = run_linear_multistep(denoiser, x, levels, x_scale, weights, basis=basis, cond=cond)
    error = float(_weighted_mean(_per_draw_mse(out, target), draw_weights))
    return error if math.isfinite(error) else math.inf


def principal_directions(samples: Tensor, k: int, seed: int = 0) -> Tensor:
    """The top-k principal directions of `samples` [N, ...] as the orthonormal columns of a
    [size, k] float64 matrix (k is capped at the size). Subspace iteration from seeded noise, then
    Rayleigh-Ritz, so image-sized samples never need a size x size covariance."""
    y = samples.reshape(len(samples), -1).double()
    y = y - y.mean(0)
    size = y.shape[1]
    k = min(k, size)
    width = min(size, k + 8)  # a few spare vectors make the iteration converge on the top k
    if width == size:
        q = torch.eye(size, dtype=y.dtype, device=y.device)
    else:
        g = torch.Generator(device="cpu").manual_seed(seed)
        q = torch.linalg.qr(torch.randn(size, width, generator=g, dtype=y.dtype).to(y.device)).Q
        for _ in range(12):
            q = torch.linalg.qr(y.T @ (y @ q)).Q
    values, vectors = torch.linalg.eigh(q.T @ (y.T @ (y @ q)))
    return q @ vectors[:, values.argsort(descending=True)[:k]]


def _check_problem(what: str, count_name: str, count, denoiser, sample_shape, sigma_min: float, sigma_max: float) -> None:
    """The argument checks `optimised_sigmas` and `fit_solver` share."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"{count_name} must be a positive integer, got {count!r}")
    if denoiser is None or sample_shape is None:
        raise ValueError(f"{what} needs denoiser= (the model) and sample_shape= (one sample's shape)")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")


class _Counted:
    """The model, counting its evaluations (each one batch of calibration draws)."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        return self.denoiser(x, sigma, **cond)


def _calibration_noise(seed: int, num_samples: int, sample_shape, sigma_max: float, variance_preserving: bool,
                       dtype, device) -> Tensor:
    """The calibration starting points: `num_samples` draws of N(0, I) from `seed`, scaled for sigma_max."""
    g = torch.Generator(device="cpu").manual_seed(int(np.random.SeedSequence([seed, 0x5C4ED]).generate_state(1)[0]))
    noise = torch.randn((num_samples, *tuple(sample_shape)), generator=g, dtype=torch.float64)
    scale = math.sqrt(1 + sigma_max**2) if variance_preserving else sigma_max
    return (noise * scale).to(dtype=dtype, device=device)


def _mined_noise(denoiser, count: int, pool_factor: int, start_sigmas: Tensor, *, seed: int, sample_shape,
                 sigma_min: float, sigma_max: float, variance_preserving: bool, dtype, device,
                 cond: dict | None) -> tuple[Tensor, Tensor]:
    """`count` calibration draws enriched in the rare ones that carry a low-NFE solver's error, and
    per-draw weights (mean 1) under which every weighted mean stays an unbiased estimate of the
    mean over all noise.

    A pool of `pool_factor * count` draws is screened, in batches of `count`: each draw scores the
    squared difference between UniPC-3 on `start_sigmas` and UniPC-3 on twice as many levels, even
    in log sigma (an estimate of the cheap solver's own error: large for the draws it sends to
    another mode). The `count // 2` highest scores are kept whole (weight 1 / pool each) and the other
    half is a uniform sample of the rest of the pool (each standing for its share of that rest).
    The draws come back shuffled, so a held-out tail holds both kinds."""
    from .sampling import sample

    pool_size = pool_factor * count
    pool = _calibration_noise(seed, pool_size, sample_shape, sigma_max, variance_preserving, dtype, device)
    steps = 2 * (len(start_sigmas) - 1)
    fine = torch.cat([torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp(),
                      torch.zeros(1, dtype=torch.float64)])
    with torch.no_grad():
        scores = torch.cat([_per_draw_mse(sample(denoiser, batch, start_sigmas, "unipc", order=3, cond=cond),
                                          sample(denoiser, batch, fine, "unipc", order=3, cond=cond))
                            for batch in pool.split(count)])
    scores = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, math.inf))
    hard = count // 2
    order = scores.argsort(descending=True).cpu()
    g = torch.Generator(device="cpu").manual_seed(seed)
    rest = order[hard:][torch.randperm(pool_size - hard, generator=g)[: count - hard]]
    weights = torch.cat([torch.full((hard,), 1.0 / pool_size, dtype=torch.float64),
                         torch.full((count - hard,), (pool_size - hard) / ((count - hard) * pool_size), dtype=torch.float64)])
    shuffle = torch.randperm(count, generator=g)
    picked = torch.cat([order[:hard], rest])[shuffle]
    return pool[picked.to(pool.device)], (weights * count)[shuffle].to(device)


def optimised_sigmas(denoiser, n: int, *, sigma_min: float, sigma_max: float, sample_shape,
                     variance_preserving: bool, solver: str = "unipc", solver_options: dict | None = None,
                     seed: int = 0, calibration: Calibration | None = None, schedule=None,
                     cond: dict | None = None, info: dict | None = None) -> Tensor:
    """n noise levels optimised for `solver` on `denoiser`, then 0 (float64, descending).

    `solver` is any deterministic fixed-NFE sampler, with `solver_options` (e.g. unipc with
    {"order": 3}; a stochastic one with {"eta": 0}). `sample_shape` is the shape of one sample
    (e.g. (3, 64, 64)); `schedule` (optional) adds the uniform-in-t bases for discrete models;
    `cond` is passed to every model call. `info`, if given, receives the model evaluations used
    (`model_calls`, never more than `max_model_calls`), the solver runs, the base schedule chosen
    and the calibration MSE before and after the search."""
    from .sampling import get_sampler, sample

    calibration = calibration or Calibration()
    calibration.check()
    _check_problem("an optimised schedule", "n (number of steps)", n, denoiser, sample_shape, sigma_min, sigma_max)
    solver_options = dict(solver_options or {})
    info_solver = get_sampler(solver)
    nfe = info_solver.nfe(n + 1)
    if info_solver.stochastic and solver_options.get("eta", 1.0) != 0:
        raise ValueError(f"solver {solver!r} is stochastic; optimise for a deterministic solver (or pass eta=0)")
    if nfe is None:
        raise ValueError(f"solver {solver!r} has a data-dependent NFE; an optimised schedule needs a fixed-step solver")
    counted = _Counted(denoiser)

    log_min, log_max = math.log(sigma_min), math.log(sigma_max)
    if calibration.mining:  # screened with UniPC-3 on nfe levels even in log sigma
        screen = torch.cat([torch.linspace(log_max, log_min, nfe, dtype=torch.float64).exp(),
                            torch.zeros(1, dtype=torch.float64)])
        x_start, draw_weights = _mined_noise(counted, calibration.num_samples, calibration.mining, screen, seed=seed,
                                             sample_shape=sample_shape, sigma_min=sigma_min, sigma_max=sigma_max,
                                             variance_preserving=variance_preserving, dtype=calibration.dtype,
                                             device=calibration.device, cond=cond)
    else:
        x_start = _calibration_noise(seed, calibration.num_samples, sample_shape, sigma_max, variance_preserving,
                                     calibration.dtype, calibration.device)
        draw_weights = None
    with torch.no_grad():
        target = reference_endpoints(counted, x_start, sigma_min, sigma_max, calibration.reference_steps, cond)
    budget = _Budget(calibration.runs(nfe))

    def loss(log_sigmas: np.ndarray) -> float | None:
        """Calibration MSE of the solver on these levels (None once the budget is spent); inf, with
        no model call, for levels that are not strictly descending inside [sigma_min, sigma_max]."""
        if not (np.all(np.diff(log_sigmas) < 0) and log_sigmas[-1] >= log_min - 1e-12):
            return math.inf
        if not budget.take():
            return None
        sigmas = torch.tensor(np.append(np.exp(log_sigmas), 0.0), dtype=torch.float64)
        sigmas[0] = sigma_max
        with torch.no_grad():
            out = sample(counted, x_start, sigmas, solver, cond=cond, **solver_options)
        value = float(_weighted_mean(_per_draw_mse(out, target), draw_weights))
        return value if math.isfinite(value) else math.inf

    bases = _base_candidates(n, sigma_min, sigma_max, schedule)
    scores = {}
    for name, base in bases.items():
        value = loss(base)
        if value is None:
            break
        scores[name] = value
    base_name = min(scores, key=scores.get)
    base, best = bases[base_name], scores[base_name]
    delta = np.zeros(min(n - 1, MAX_KNOTS))
    if len(delta) and math.isfinite(best):
        best, delta = _pattern_search(loss, base, best, delta, (log_max - log_min) / (n - 1))
    sigmas = torch.tensor(np.append(np.exp(_apply(base, delta)), 0.0), dtype=torch.float64)
    sigmas[0] = sigma_max
    sigmas[-2] = max(float(sigmas[-2]), sigma_min)
    if info is not None:
        info.update(model_calls=counted.calls, solver_runs=budget.used, nfe=nfe, base=base_name,
                    loss_initial=scores[base_name], loss_final=best, max_model_calls=calibration.max_model_calls(nfe))
    return sigmas


def _apply(base: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """base + d(u_i), u_i = i / (n - 1), with d piecewise linear through (j / K, delta_j) and d(0) = 0."""
    n = len(base)
    if len(delta) == 0:
        return base.copy()
    knots = np.linspace(0, 1, len(delta) + 1)
    return base + np.interp(np.linspace(0, 1, n), knots, np.concatenate([[0.0], delta]))


def _pattern_search(loss, base, best, delta, gap):
    """Coordinate pattern search on the knot offsets: try a step in the last good direction, then
    the other; on success grow the step, otherwise try the vertex of the parabola through the three
    values (when they bracket a minimum) and halve the step. Stops when the budget is spent or every
    step is below 1e-3 in log sigma."""
    steps = np.full(len(delta), float(np.clip(0.4 * gap, 0.02, 1.0)))
    while np.abs(steps).max() > 1e-3:
        for j in range(len(delta)):
            s = steps[j]
            if abs(s) <= 1e-3:
                continue
            values = {}
            for sign in (1.0, -1.0):
                trial = delta.copy()
                trial[j] += sign * s
                value = loss(_apply(base, trial))
                if value is None:
                    return best, delta
                values[sign] = value
                if value < best:
                    best, delta = value, trial
                    steps[j] = sign * s * 1.6
                    break
            else:
                lo, hi = values[-1.0], values[1.0]
                curvature = lo - 2 * best + hi
                if math.isfinite(curvature) and curvature > 0:
                    offset = s * (lo - hi) / (2 * curvature)
                    if abs(offset) > 1e-4:
                        trial = delta.copy()
                        trial[j] += offset
                        value = loss(_apply(base, trial))
                        if value is None:
                            return best, delta
                        if value < best:
                            best, delta = value, trial
                steps[j] = s * 0.5
    return best, delta


# ---------------------------------------------------------------------------------------------
# A fitted solver: levels and multistep coefficients together
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SolverFit:
    """Budget and numerics of `fit_solver`.

    num_samples: calibration noise draws; the last `validation` fraction of them is held out and
    decides which coefficients are kept (the rare samples that change mode dominate the error, and
    a fit to a few hundred of them does not carry over to new noise). batch_size: draws per
    gradient step. iterations: Adam steps (cosine decay from `learning_rate` to 0), with a
    validation pass every `validate_every` steps. trajectory_weight: weight of the second term of the
    loss, the mean squared distance of the solver's intermediate states from the reference
    trajectory at the same levels (both divided by sqrt(1 + sigma^2)). The endpoint error alone is
    carried by a few draws that change mode, and fitting them does not carry over to new noise;
    whether a draw changes mode is decided by how far the states drift from the trajectory at
    middle noise levels, which every draw measures. directions: how many of the top principal
    directions of the model's samples (the reference endpoints of the fit draws) get multistep
    numbers of their own (`sampling/fitted.py`); 0: one set for the whole state. direction_rate:
    the learning rate of their differences from the shared numbers, as a fraction of
    `learning_rate` (all parameters at the full rate made the fit unstable). start: the
    `optimised_sigmas` budget of the UniPC-3 schedule that is one of the fit's two starts (mined,
    like the fit's own draws: on 16,384 test draws at NFE 10 the fit rarely beats a well-calibrated
    start, so the start's calibration decides most of the result). mining: 0, or the size of a
    pool of noise draws, as a multiple of `num_samples`, that is screened for the draws a low-NFE
    solver gets most wrong (`_mined_noise`); half the calibration draws are then those, weighted so
    that every loss and held-out error stays an unbiased mean over all noise. Costs
    `mining * 3 * nfe` batched evaluations more. (Measured in benchmarks/RESULTS.md, issue 3.)
    """

    num_samples: int = 16384
    batch_size: int = 2048
    validation: float = 0.25
    reference_steps: int = 200
    iterations: int = 1000
    validate_every: int = 25
    learning_rate: float = 3e-3
    trajectory_weight: float = 1.0
    directions: int = 8
    direction_rate: float = 0.1
    mining: int = 8
    start: Calibration = Calibration(num_samples=2048, mining=8)
    dtype: torch.dtype = torch.float32
    device: str | torch.device = "cpu"

    def max_model_calls(self, nfe: int) -> int:
        """Forward model evaluations a fit for `nfe` may use, each on at most `num_samples` draws;
        the `iterations * nfe` of the gradient steps (on `batch_size` draws) also have a backward pass."""
        validations = self.iterations // self.validate_every + 2
        shapes = len(SHAPES) * len(END_FRACTIONS)  # scored once each to pick the second start
        return (self.start.max_model_calls(nfe) + self.reference_steps
                + (shapes + 2 * (self.iterations + validations) + 3 * self.mining) * nfe)

    def check(self) -> None:
        Calibration(self.num_samples, self.reference_steps).check()
        self.start.check()
        for name in ("directions", "mining"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        for name in ("batch_size", "validate_every"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not (isinstance(self.iterations, int) and self.iterations >= 0):
            raise ValueError(f"iterations must be a non-negative integer, got {self.iterations!r}")
        if not 0 < self.validation < 1 or round(self.num_samples * self.validation) < 1:
            raise ValueError(f"validation must be a fraction in (0, 1) that holds out at least one draw, "
                             f"got {self.validation!r} of {self.num_samples}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not self.direction_rate > 0:
            raise ValueError(f"direction_rate must be > 0, got {self.direction_rate!r}")
        if not self.trajectory_weight >= 0:
            raise ValueError(f"trajectory_weight must be >= 0, got {self.trajectory_weight!r}")


def fit_solver(denoiser, nfe: int, *, sigma_min: float, sigma_max: float, sample_shape, variance_preserving: bool,
               seed: int = 0, settings: SolverFit | None = None, schedule=None, cond: dict | None = None,
               info: dict | None = None):
    """Noise levels and coefficients of the `fitted` sampler (`sampling/fitted.py`) for `nfe` model
    evaluations, fitted to `denoiser` alone. Returns (sigmas, coefficients): run them with
    `sample(denoiser, x, sigmas, "fitted", coefficients=coefficients)`.

    Method:
    1. Data: `num_samples` calibration draws and their reference endpoints and trajectories (as in
       `optimised_sigmas`; with `mining`, half of them the hardest of a larger screened pool, and
       every mean weighted); a `validation` fraction is held out. The top `directions` principal
       directions of the fit draws' endpoints (the model's own samples) get numbers of their own.
    2. Starts: UniPC-3 (a point of the fitted family, `FittedCoefficients.from_sampler`) on its
       `optimised_sigmas` schedule, and on whichever of the 42 standard shapes of that search has
       the lowest endpoint error on the fit draws; steps 3-4 run from each.
    3. Fit: Adam on minibatches of the MSE against the reference endpoints plus `trajectory_weight`
       times the states' MSE against the reference trajectory (see SolverFit), over the n - 1 free log
       levels (the first stays sigma_max), the state multipliers and the output weights (shared,
       and per direction, all starting from the start's), by
       backpropagation through the solver and the model (to its input only: the model's parameters
       get no gradient). The levels stay strictly descending inside [sigma_min, sigma_max].
    4. Keep: whichever of the starts and the validated checkpoints has the lowest held-out MSE, so
       the fit never returns something worse on new noise than its starts, up to validation noise.
    Budget: `settings.max_model_calls(nfe)`."""
    from .sampling.fitted import FittedCoefficients, run_linear_multistep

    settings = settings or SolverFit()
    settings.check()
    _check_problem("fit_solver", "nfe (model evaluations)", nfe, denoiser, sample_shape, sigma_min, sigma_max)
    counted = _Counted(denoiser)

    start_info: dict = {}
    start = optimised_sigmas(counted, nfe, sigma_min=sigma_min, sigma_max=sigma_max, sample_shape=sample_shape,
                             variance_preserving=variance_preserving, solver="unipc", solver_options={"order": 3},
                             seed=seed, calibration=replace(settings.start, dtype=settings.dtype, device=settings.device),
                             schedule=schedule, cond=cond, info=start_info) if nfe > 1 else \
        torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    if settings.mining:
        x_all, draw_weights = _mined_noise(counted, settings.num_samples, settings.mining, start, seed=seed + 1,
                                           sample_shape=sample_shape, sigma_min=sigma_min, sigma_max=sigma_max,
                                           variance_preserving=variance_preserving, dtype=settings.dtype,
                                           device=settings.device, cond=cond)
    else:
        x_all = _calibration_noise(seed + 1, settings.num_samples, sample_shape, sigma_max, variance_preserving,
                                   settings.dtype, settings.device)
        draw_weights = None
    trajectory: list | None = [] if settings.trajectory_weight > 0 else None
    with torch.no_grad():
        target_all = reference_endpoints(counted, x_all, sigma_min, sigma_max, settings.reference_steps, cond,
                                         trajectory)
    if not torch.isfinite(target_all).all():  # before the principal directions, which would fail on it
        raise RuntimeError("fit_solver: the model's output is not finite on the calibration noise")
    held_out = max(1, round(settings.num_samples * settings.validation))
    if trajectory is not None:  # [levels, fit draws, ...], levels even in log sigma from sigma_max down
        trajectory = torch.stack(trajectory)[:, :-held_out]
    x_fit, target_fit = x_all[:-held_out], target_all[:-held_out]
    x_val, target_val = x_all[-held_out:], target_all[-held_out:]
    w_fit, w_val = (None, None) if draw_weights is None else (draw_weights[:-held_out], draw_weights[-held_out:])
    basis = principal_directions(target_fit, settings.directions, seed) if settings.directions else None
    sets = 1 if basis is None else basis.shape[1] + 1  # the directions' numbers, then the shared ones

    # The starts: UniPC-3 on its optimised levels, and on the standard shape with the lowest endpoint
    # error on the fit draws (many more than the optimised schedule was calibrated on). Which one
    # fits better depends on the model (random-4d: time-uniform levels, held-out RMSE 0.087 against
    # 0.113; random-32d: the optimised ones, 0.072 against 0.155), so both are fitted.
    starts = {"optimised": start}
    if nfe > 1:
        shapes = {name: torch.cat([torch.from_numpy(levels).exp(), torch.zeros(1, dtype=torch.float64)])
                  for name, levels in _base_candidates(nfe, sigma_min, sigma_max, schedule).items()}
        errors = {}
        for name, levels in shapes.items():
            levels, coefficients = FittedCoefficients.from_sampler(levels, "unipc", order=3)
            errors[name] = _endpoint_mse(counted, x_fit, target_fit, levels[:-1], *coefficients.tensors(), cond,
                                         draw_weights=w_fit)
        best_shape = min(errors, key=errors.get)
        starts[best_shape] = shapes[best_shape]

    log_max, log_min, gap = math.log(sigma_max), math.log(sigma_min), 1e-3
    mask = torch.tril(torch.ones(nfe, nfe, 1, dtype=torch.float64))

    def fit_from(start_levels: Tensor):
        """Adam from one start; returns (held-out MSE at the start, best held-out MSE, its sigmas, x_scale, weights)."""
        start_sigmas, start_coefficients = FittedCoefficients.from_sampler(start_levels, "unipc", order=3)
        x_scale0, weights0 = start_coefficients.tensors()
        # The state is about sqrt(1 + sigma^2) in size, so its multiplier is learnt as an offset in those units.
        log_levels = torch.nn.Parameter(start_sigmas[1:-1].log().clone())
        x_offsets = torch.nn.Parameter((x_scale0 - start_sigmas[1:-1] / start_sigmas[:-2])
                                       * (1 + start_sigmas[:-2] ** 2).sqrt())
        weights = torch.nn.Parameter(weights0.clone())
        # The directions' numbers are the shared ones plus deltas learnt at a lower rate: the shared
        # solver then fits as without directions, and the directions refine it.
        x_deltas = torch.nn.Parameter(x_offsets.new_zeros(nfe - 1, sets - 1))
        weight_deltas = torch.nn.Parameter(weights.new_zeros(nfe, nfe, sets - 1))
        params = [log_levels, x_offsets, weights, x_deltas, weight_deltas]

        def current() -> tuple[Tensor, Tensor, Tensor]:
            """sigmas, and x_scale and weights in `FittedCoefficients.tensors()`'s layout."""
            sigmas = torch.cat([torch.tensor([sigma_max], dtype=torch.float64), log_levels.exp()])
            offsets = torch.cat([x_offsets[:, None] + x_deltas, x_offsets[:, None]], 1)
            x_scale = sigmas[1:, None] / sigmas[:-1, None] + offsets / (1 + sigmas[:-1, None] ** 2).sqrt()
            w = torch.cat([weights[..., None] + weight_deltas, weights[..., None]], 2) * mask
            return (sigmas, x_scale[:, 0], w[..., 0]) if basis is None else (sigmas, x_scale, w)

        def loss(x: Tensor, target: Tensor, reference_states: Tensor | None, batch_weights: Tensor | None) -> Tensor:
            sigmas, x_scale, w = current()
            states: list[Tensor] = []
            out = run_linear_multistep(counted, x, sigmas, x_scale, w, basis=basis, cond=cond,
                                       states=states if reference_states is not None else None)
            value = _weighted_mean(_per_draw_mse(out, target), batch_weights)
            if reference_states is not None and len(states) > 1:  # states[:-1]: at sigmas[1:]
                drift = sum(_weighted_mean(_per_draw_mse(state / (1 + sigma**2).sqrt(),
                                                         reference_state(reference_states, sigma, sigma_min, sigma_max,
                                                                         settings.reference_steps)), batch_weights)
                            for state, sigma in zip(states[:-1], sigmas[1:]))
                value = value + settings.trajectory_weight * drift / (len(states) - 1)
            return value

        def validate(best):
            value = _endpoint_mse(counted, x_val, target_val, *current(), cond, basis, w_val)  # held out: the endpoint alone
            if math.isfinite(value) and (best is None or value < best[0]):
                return value, [p.detach().clone() for p in params]
            return best

        best = validate(None)
        validation_start = best[0] if best is not None else math.inf
        optimizer = torch.optim.Adam([{"params": params[:3]},
                                      {"params": params[3:], "lr": settings.learning_rate * settings.direction_rate}],
                                     lr=settings.learning_rate)
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(settings.iterations, 1))
        g = torch.Generator(device="cpu").manual_seed(seed)
        for step in range(1, settings.iterations + 1):
            pick = torch.randperm(len(x_fit), generator=g)[: settings.batch_size].to(x_fit.device)
            value = loss(x_fit[pick], target_fit[pick], None if trajectory is None else trajectory[:, pick],
                         None if w_fit is None else w_fit[pick])
            if not torch.isfinite(value):
                break
            for p, grad in zip(params, torch.autograd.grad(value, params)):
                p.grad = grad
            optimizer.step()
            decay.step()
            with torch.no_grad():  # keep the levels strictly descending inside [sigma_min, sigma_max]
                upper = log_max
                for i in range(len(log_levels)):
                    lower = log_min + (len(log_levels) - 1 - i) * gap
                    log_levels[i] = log_levels[i].clamp(min(lower, upper - gap), upper - gap)
                    upper = float(log_levels[i])
            if step % settings.validate_every == 0 or step == settings.iterations:
                best = validate(best)
        if best is None:
            return validation_start, math.inf, None, None, None
        with torch.no_grad():
            for p, value in zip(params, best[1]):
                p.copy_(value)
            return (validation_start, best[0], *current())

    fits = {name: fit_from(levels) for name, levels in starts.items()}
    start_name = min(fits, key=lambda name: fits[name][1])
    validation_start, validation_best, sigmas, x_scale, w = fits[start_name]
    if sigmas is None:
        raise RuntimeError("fit_solver: the model's output is not finite on the calibration noise")
    if info is not None:
        info.update(model_calls=counted.calls, nfe=nfe, start_base=start_info.get("base"), start=start_name,
                    validation_mse_start=validation_start, validation_mse=validation_best,
                    max_model_calls=settings.max_model_calls(nfe))
    return torch.cat([sigmas.detach(), sigmas.new_zeros(1)]), FittedCoefficients.from_tensors(x_scale, w, basis)
