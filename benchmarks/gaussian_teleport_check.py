"""Would skipping the high-noise part of the flow in closed form help at 5-10 NFE? (issue 3)

    python benchmarks/fitted_solver_check.py MIXTURE NFE --cache FILE --no-peers   # makes FILE
    python benchmarks/gaussian_teleport_check.py MIXTURE FILE NFE [--samples 4096]

For Gaussian data with mean mu and covariance U diag(lam) U^T the probability-flow ODE has a closed
form: x(s1) = mu + U diag(sqrt((lam + s1^2) / (lam + s0^2))) U^T (x(s0) - mu). At high noise every
data distribution looks Gaussian, so a sampler could start at a lower level s1 from this
"teleported" state and spend all its model evaluations below s1. This script measures that against
the same sampler started at sigma_max, both on time-uniform levels (diffusers' `trailing`, the
best peers' spacing at NFE 10), RMSE against the exact ODE endpoints of FILE's test draws. The
moments come from 16,384 samples of the mixture: what a model's own samples would give at best.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from diffusekit import Denoiser, NoiseSchedule, sample
from diffusekit._utils import run_script
from diffusekit.bench.samplers import load_mixture

SOLVERS = (("unipc", {"order": 3}), ("unipc", {"order": 2}), ("ipndm", {}))
STARTS = (100.0, 80.0, 60.0, 40.0, 25.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mixture", help="2d, 64d, random:DIM:COMPONENTS:SEED or a JSON spec")
    parser.add_argument("cache", help="test noise and exact endpoints written by fitted_solver_check.py --cache")
    parser.add_argument("nfe", type=int)
    parser.add_argument("--samples", type=int, default=4096, help="test draws used from the cache")
    args = parser.parse_args()
    torch.set_num_threads(1)
    name, mixture = load_mixture(args.mixture)
    schedule = NoiseSchedule.from_name("linear")
    denoiser = Denoiser(mixture.eps_network(schedule), schedule, "eps")
    try:
        cached = torch.load(args.cache, weights_only=True)
        cached_mixture = cached["key"]["mixture"]
    except OSError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"cannot read the cache {args.cache} ({type(e).__name__}): write it with "
                         "fitted_solver_check.py --cache") from None
    if cached_mixture != name:
        raise ValueError(f"the cache {args.cache} holds draws for {cached_mixture}, not {name}")
    x_T, exact = cached["x_T"][:args.samples], cached["reference"][:args.samples]
    sigma_max = schedule.sigma_max
    x_start = x_T.double() * math.sqrt(1 + sigma_max**2)  # the VP draw as a state at sigma_max

    samples = mixture.sample(16384, generator=torch.Generator().manual_seed(1))
    mean = samples.mean(0)
    variances, basis = torch.linalg.eigh(torch.cov(samples.T))
    variances = variances.clamp_min(0)

    def teleport(x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        along = (x - mean) @ basis * torch.sqrt((variances + sigma_to**2) / (variances + sigma_from**2))
        return mean + along @ basis.T

    def time_uniform_from(top: float, n: int) -> torch.Tensor:
        t_top = float(schedule.sigma_to_t(torch.tensor([top], dtype=torch.float64)))
        t = torch.tensor([t_top * (1 - i / n) for i in range(n)], dtype=torch.float64)
        return torch.cat([schedule.t_to_sigma(t).double(), torch.zeros(1, dtype=torch.float64)])

    def score(label: str, out: torch.Tensor) -> None:
        errors = ((out.double() - exact) ** 2).mean(1)
        print(f"{label:52s} RMSE {float(errors.mean().sqrt()):.4f}  mode changes {int((errors > 0.1).sum()):4d}",
              flush=True)

    print(f"{args.mixture}, NFE {args.nfe}, {len(x_T)} test draws")
    for method, options in SOLVERS:
        label = f"{method} {options or ''}".strip()
        score(f"{label}, trailing from {sigma_max:.0f}",
              sample(denoiser, x_start.float(), schedule.get_sigmas(args.nfe, "trailing").float(), method, **options))
        for top in STARTS:
            score(f"{label}, teleported to {top:.0f}, time-uniform",
                  sample(denoiser, teleport(x_start, sigma_max, top).float(), time_uniform_from(top, args.nfe).float(),
                         method, **options))


if __name__ == "__main__":
    sys.exit(run_script(main))
