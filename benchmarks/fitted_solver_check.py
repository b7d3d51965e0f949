"""The fitted solver on many fresh test draws, against the peers' best schedules, at one NFE.

    python benchmarks/fitted_solver_check.py MIXTURE NFE [--samples 16384] [--cache FILE]
        [--fit '{"iterations": 1000}' ...] [--label NAME ...]

At 5-10 NFE the RMSE on the oracle mixtures is carried by the few draws that a solver sends to
another mode than the exact flow (a few in a thousand), so the bench's 512-2,048 test draws move a
ratio by tens of percent. This script scores on 16,384 draws (their exact ODE endpoints take
minutes; --cache keeps them in a file). The peers are stood in for by diffusekit's own UniPC-3,
UniPC-2 and DEIS-3 (and iPNDM, ours) on diffusers' `trailing` and `linspace` spacings: the parity
tests hold them to diffusers' schedulers on the same levels, and on the bench these were the best
peers at NFE 10. Each --fit is a JSON object of `SolverFit` overrides (`--fit '{}'`: the
defaults; `"start"` takes an object of `Calibration` fields); each --optimised scores a solver on
its `optimised` schedule with the given calibration. Prints RMSE, the count of draws with a squared
error above 0.1 (mode changes) and the RMSE of the others.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from diffusekit import Denoiser, NoiseSchedule, sample
from diffusekit._utils import atomic_path, run_script
from diffusekit.bench.samplers import build_case, load_mixture, parse_spec
from diffusekit.schedule_opt import Calibration, SolverFit, fit_solver

PEER_STANDINS = (("unipc", {"order": 3}), ("unipc", {"order": 2}), ("deis", {"order": 3}), ("ipndm", {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mixture", help="2d, 64d, random:DIM:COMPONENTS:SEED or a JSON spec")
    parser.add_argument("nfe", type=int)
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=5, help="test noise seed (the fit uses its own, seed 0)")
    parser.add_argument("--cache", help="file for the test noise and its exact endpoints (made if missing)")
    parser.add_argument("--fit", action="append", default=[], help="SolverFit overrides as JSON (repeatable)")
    parser.add_argument("--label", action="append", default=[], help="a name per --fit")
    parser.add_argument("--optimised", nargs=2, action="append", default=[], metavar=("SOLVER", "CALIBRATION"),
                        help="also score SOLVER (e.g. unipc:order=3) on its optimised schedule, with the "
                             "Calibration overrides given as JSON (e.g. '{\"num_samples\": 2048, \"mining\": 8}'; "
                             "repeatable)")
    parser.add_argument("--calibration-seeds", type=int, nargs="+", default=[0],
                        help="each --optimised runs once per calibration seed (the spread of the search)")
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    name, mixture = load_mixture(args.mixture)
    schedule = NoiseSchedule.from_name("linear")
    denoiser = Denoiser(mixture.eps_network(schedule), schedule, "eps")
    if len(args.label) > len(args.fit):
        raise ValueError(f"{len(args.label)} --label for {len(args.fit)} --fit: give one label per fit")
    key = {"mixture": name, "samples": args.samples, "seed": args.seed}
    if args.cache and Path(args.cache).exists():
        try:
            cached = torch.load(args.cache, weights_only=True)
            x_T, exact = cached["x_T"], cached["reference"]
        except Exception as e:  # a truncated or foreign file
            raise ValueError(f"cannot read the cache {args.cache} ({type(e).__name__}); delete it to rebuild") from None
        if cached.get("key") != key:
            raise ValueError(f"the cache {args.cache} holds {cached.get('key')}, not {key}: use another --cache file")
    else:
        case = build_case(name, mixture, schedule, args.samples, args.seed)
        x_T, exact = case.x_T, case.reference
        if args.cache:
            with atomic_path(args.cache) as tmp:
                torch.save({"key": key, "x_T": x_T, "reference": exact}, tmp)
    print(f"{name}, NFE {args.nfe}, {len(x_T)} test draws")

    def score(label: str, sigmas, method: str, **options) -> None:
        out = sample(denoiser, x_T * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, method, **options)
        errors = ((out.double() - exact) ** 2).mean(1)
        calm = errors <= 0.1
        print(f"{label:58s} RMSE {float(errors.mean().sqrt()):.4f}  mode changes {int((~calm).sum()):5d}  "
              f"RMSE of the rest {float(errors[calm].mean().sqrt()):.4f}", flush=True)

    if not args.no_peers:
        for method, options in PEER_STANDINS:
            for spacing in ("trailing", "linspace"):
                score(f"{method} {options or ''} {spacing}", schedule.get_sigmas(args.nfe, spacing), method, **options)
    for solver, overrides in args.optimised:
        method, options = parse_spec(solver)
        try:
            calibration = replace(Calibration(dtype=torch.float64), **json.loads(overrides))
        except TypeError as e:
            raise ValueError(f"--optimised {overrides}: {e}; the fields are those of Calibration") from None
        for seed in args.calibration_seeds:
            start = time.perf_counter()
            sigmas = schedule.get_sigmas(args.nfe, "optimised", denoiser=denoiser, sample_shape=(mixture.dim,),
                                         solver=method, solver_options=options, calibration=calibration, seed=seed)
            score(f"{solver} optimised, {overrides}, seed {seed} ({time.perf_counter() - start:.0f}s)", sigmas, method,
                  **options)
    labels = args.label + [f"fit {i}" for i in range(len(args.label), len(args.fit))]
    for label, overrides in zip(labels, args.fit):
        try:
            fields = json.loads(overrides)
            if isinstance(fields.get("start"), dict):  # the start schedule's Calibration, as a JSON object
                fields["start"] = Calibration(**fields["start"])
            settings = replace(SolverFit(dtype=torch.float64), **fields)
        except TypeError as e:  # an unknown field
            raise ValueError(f"--fit {overrides}: {e}; the fields are those of diffusekit.schedule_opt.SolverFit "
                             "(and of Calibration for 'start')") from None
        start, info = time.perf_counter(), {}
        sigmas, coefficients = fit_solver(denoiser, args.nfe, sigma_min=schedule.sigma_min,
                                          sigma_max=schedule.sigma_max, sample_shape=(mixture.dim,),
                                          variance_preserving=True, settings=settings, schedule=schedule, info=info)
        score(f"fitted, {label} (start {info['start']}, {time.perf_counter() - start:.0f}s)", sigmas, "fitted",
              coefficients=coefficients)


if __name__ == "__main__":
    sys.exit(run_script(main))
