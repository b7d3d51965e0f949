"""A linear multistep solver whose coefficients are fitted to one model (`schedule_opt.fit_solver`).

With model outputs D_j = D(x_j, sigma_j) at the n noise levels sigma_0 > ... > sigma_{n-1} > 0:

    x_{i+1} = x_scale[i] * x_i + sum_{j <= i} weights[i][j] * D_j      (i < n - 1)
    output  =                    sum_{j <= n-1} weights[n-1][j] * D_j

Every deterministic data-prediction multistep solver (DDIM, DPM-Solver++(2M), ...) is one choice of
these numbers (`FittedCoefficients.from_sampler` finds them); the fitted ones are
whatever minimises the endpoint error on the model's own trajectories. Since x_i is itself a linear
combination of x_0 and D_0..D_{i-1}, this is the most general solver that is linear in the model's
outputs (the subspace that PCA-based correctors such as PAS search in).

Directions: the numbers may also differ by direction. With unit vectors u_1..u_k (orthonormal;
`fit_solver` takes the model's top principal directions), the state's component along u_m is
advanced with that direction's own x_scale and weights, and the rest of the state with the shared
ones. The flow along a direction of large data variance (one that separates modes) is nothing like
the flow along one of small variance (inside a mode: there D(x, sigma) barely depends on x until
sigma is small), and no single set of numbers integrates both well; for Gaussian data, one set per
principal direction can be exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import trange

from .common import check_sigmas, report
from .registry import register


@dataclass(frozen=True)
class Direction:
    """A unit vector (over the flattened sample) and the x_scale / weights its component gets."""

    vector: tuple[float, ...]
    x_scale: tuple[float, ...]
    weights: tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class FittedCoefficients:
    """x_scale: n - 1 multipliers of the state; weights: n rows, row i the i + 1 weights of D_0..D_i.
    directions: orthonormal directions with numbers of their own (module docstring); x_scale and
    weights then act on the rest of the state."""

    x_scale: tuple[float, ...]
    weights: tuple[tuple[float, ...], ...]
    directions: tuple[Direction, ...] = ()

    def __post_init__(self):
        n = len(self.weights)
        for x_scale, weights in [(self.x_scale, self.weights)] + [(d.x_scale, d.weights) for d in self.directions]:
            if n < 1 or len(x_scale) != n - 1 or len(weights) != n or any(len(row) != i + 1 for i, row in enumerate(weights)):
                raise ValueError("FittedCoefficients needs n - 1 x_scale values and n weight rows, row i of length i + 1, "
                                 f"for the shared numbers and every direction; got {len(x_scale)} and rows of lengths "
                                 f"{[len(r) for r in weights]}")
            if not all(math.isfinite(v) for v in list(x_scale) + [w for row in weights for w in row]):
                raise ValueError("FittedCoefficients must be finite")
        if self.directions:
            basis = self.basis()
            if basis.shape[0] < len(self.directions) or not torch.allclose(
                    basis.T @ basis, torch.eye(len(self.directions), dtype=basis.dtype), atol=1e-6):
                raise ValueError("the directions of FittedCoefficients must be orthonormal vectors of one length")

    @property
    def num_levels(self) -> int:
        return len(self.weights)

    def basis(self, dtype=torch.float64) -> Tensor | None:
        """The directions as the columns of a [size, k] matrix (None without directions)."""
        if not self.directions:
            return None
        if len({len(d.vector) for d in self.directions}) != 1:
            raise ValueError("the directions of FittedCoefficients must be orthonormal vectors of one length")
        return torch.tensor([d.vector for d in self.directions], dtype=dtype).T

    @classmethod
    def from_tensors(cls, x_scale: Tensor, weights: Tensor, basis: Tensor | None = None) -> "FittedCoefficients":
        """From a [n - 1] tensor and a lower-triangular [n, n] one; with a [size, k] `basis`, from
        [n - 1, k + 1] and [n, n, k + 1] ones whose last entries are the shared numbers."""
        def rows(a: Tensor, w: Tensor):
            w = w.detach().double().tolist()
            return tuple(float(v) for v in a.detach().double().tolist()), tuple(tuple(w[i][: i + 1]) for i in range(len(w)))

        if basis is None:
            return cls(*rows(x_scale, weights))
        directions = tuple(Direction(tuple(basis[:, m].detach().double().tolist()), *rows(x_scale[:, m], weights[..., m]))
                           for m in range(basis.shape[1]))
        return cls(*rows(x_scale[:, -1], weights[..., -1]), directions)

    def tensors(self, dtype=torch.float64) -> tuple[Tensor, Tensor]:
        """x_scale [n - 1] and weights [n, n]; with directions [n - 1, k + 1] and [n, n, k + 1] (the
        directions' numbers, then the shared ones; `basis()` gives the matching vectors)."""
        n = self.num_levels
        sets = [(d.x_scale, d.weights) for d in self.directions] + [(self.x_scale, self.weights)]
        weights = torch.zeros(n, n, len(sets), dtype=dtype)
        for m, (_, rows) in enumerate(sets):
            for i, row in enumerate(rows):
                weights[i, : i + 1, m] = torch.tensor(row, dtype=dtype)
        x_scale = torch.tensor([a for a, _ in sets], dtype=dtype).reshape(len(sets), n - 1).T
        if not self.directions:
            return x_scale[:, 0], weights[..., 0]
        return x_scale, weights

    @classmethod
    def from_sampler(cls, sigmas, method: str, **options) -> tuple[Tensor, "FittedCoefficients"]:
        """The levels and coefficients that reproduce a deterministic sampler which is linear in its
        state and the model's outputs (DDIM, DPM-Solver++, UniPC, DEIS, iPNDM, ...) on `sigmas`.

        The sampler runs once on coefficient vectors over the basis (x_0, D_0, D_1, ...): the
        stand-in model records where it is evaluated and returns the next basis vector, so every
        state comes out as its exact linear combination. Returns (levels ending in 0, coefficients)."""
        from . import get_sampler, sample

        info = get_sampler(method)
        nfe = info.nfe(len(sigmas))
        if info.stochastic and options.get("eta", 1.0) != 0 or nfe is None:
            raise ValueError(f"sampler {method!r} is not a fixed-step deterministic one; cannot take its coefficients")
        size = nfe + 1
        states, levels = [], []

        def basis_model(x, sigma, **cond):
            states.append(x[0].clone())
            levels.append(float(sigma[0]))
            out = torch.zeros_like(x)
            out[0, len(states)] = 1.0
            return out

        start = torch.zeros(1, size, dtype=torch.float64)
        start[0, 0] = 1.0
        final = sample(basis_model, start, torch.as_tensor(sigmas, dtype=torch.float64), method, **options)[0]
        if not all(a > b for a, b in zip(levels, levels[1:])):
            raise ValueError(f"sampler {method!r} does not evaluate the model at descending levels; "
                             "it has no multistep form")
        states.append(final)
        x_scale, weights = [], []
        for i in range(nfe):
            now, nxt = states[i], states[i + 1]
            a = 0.0 if i == nfe - 1 else float(nxt[0] / now[0])
            if i < nfe - 1:
                x_scale.append(a)
            weights.append(tuple(float(nxt[j + 1] - a * now[j + 1]) for j in range(i + 1)))
            if any(abs(float(v)) > 1e-12 for v in (nxt - a * now)[i + 2:]):
                raise ValueError(f"sampler {method!r} is not linear in the form of the fitted sampler")
        return torch.tensor(levels + [0.0], dtype=torch.float64), cls(tuple(x_scale), tuple(weights))

    def to_dict(self) -> dict:
        out = {"x_scale": list(self.x_scale), "weights": [list(row) for row in self.weights]}
        if self.directions:
            out["directions"] = [{"vector": list(d.vector), "x_scale": list(d.x_scale),
                                  "weights": [list(row) for row in d.weights]} for d in self.directions]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "FittedCoefficients":
        """From `to_dict`'s output (e.g. read back from JSON)."""
        def numbers(d: dict):
            return tuple(float(a) for a in d["x_scale"]), tuple(tuple(float(w) for w in row) for row in d["weights"])

        try:  # parsed first, built after: the constructors' own checks keep their messages
            parsed = [(tuple(float(v) for v in d["vector"]), *numbers(d)) for d in data.get("directions", ())]
            shared = numbers(data)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError("fitted coefficients need lists of numbers 'x_scale' and 'weights' (and, per "
                             f"direction, 'vector'), as to_dict writes them: {e!r}") from None
        return cls(*shared, tuple(Direction(*d) for d in parsed))


def run_linear_multistep(denoiser, x: Tensor, sigmas: Tensor, x_scale: Tensor, weights: Tensor, *,
                         basis: Tensor | None = None, cond: dict | None = None, callback=None,
                         progress: bool = False, states: list | None = None) -> Tensor:
    """The solver of the module docstring with tensor coefficients and levels (`sigmas`: the n
    levels, without the final 0), in `FittedCoefficients.tensors()`'s layout; with a [size, k]
    `basis`, the numbers per direction. Differentiable in all of them: `fit_solver` trains through it.
    `states`, a list, receives x after every step (the last one is the output)."""
    outputs, projected = [], []
    n = len(sigmas)
    if basis is not None:
        basis, x_scale, weights = basis.to(x), x_scale.to(x), weights.to(x)  # x's dtype and device
        # The shared numbers advance the whole state; each direction's component is then corrected
        # by the difference of its numbers from the shared ones.
        x_extra, w_extra = x_scale[:, :-1] - x_scale[:, -1:], weights[..., :-1] - weights[..., -1:]
        x_scale, weights = x_scale[:, -1], weights[..., -1]
    for i in trange(n, disable=not progress, desc="fitted"):
        sigma = sigmas[i].to(x.dtype).expand(x.shape[0])
        outputs.append(denoiser(x, sigma, **(cond or {})))
        combined = sum(weights[i, j].to(x.dtype) * outputs[j] for j in range(i + 1))
        if basis is not None:
            projected.append(outputs[-1].reshape(len(x), -1) @ basis)
            along = sum(w_extra[i, j] * projected[j] for j in range(i + 1))
            if i < n - 1:
                along = along + x_extra[i] * (x.reshape(len(x), -1) @ basis)
            combined = combined + (along @ basis.T).reshape(x.shape)
        x = combined if i == n - 1 else x_scale[i].to(x.dtype) * x + combined
        if states is not None:
            states.append(x)
        if callback is not None:
            report(callback, i, x, float(sigmas[i]), float(sigmas[i + 1]) if i < n - 1 else 0.0, outputs[-1])
    return x


@register("fitted", nfe=lambda n: n - 1, stochastic=False)
@torch.no_grad()
def fitted(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, progress=False,
           cond: dict | None = None, coefficients: FittedCoefficients | None = None) -> Tensor:
    """Linear multistep solver with coefficients fitted to the model (`schedule_opt.fit_solver`
    returns the levels and the `coefficients` together); without coefficients, those of
    DPM-Solver++(2M) on `sigmas`. NFE = len(sigmas) - 1."""
    sigmas = check_sigmas(x, sigmas)
    if coefficients is None:
        _, coefficients = FittedCoefficients.from_sampler(sigmas, "dpmpp_2m")
    if not isinstance(coefficients, FittedCoefficients):
        raise ValueError(f"coefficients must be a FittedCoefficients (from schedule_opt.fit_solver or "
                         f"FittedCoefficients.from_sampler), got {type(coefficients).__name__}")
    if coefficients.num_levels != len(sigmas) - 1:
        raise ValueError(f"these coefficients were fitted for {coefficients.num_levels} noise levels; "
                         f"got {len(sigmas) - 1} (use the sigmas fit_solver returned with them)")
    basis = coefficients.basis()
    if basis is not None and basis.shape[0] != x[0].numel():
        raise ValueError(f"these coefficients were fitted for samples of {basis.shape[0]} numbers; got {x[0].numel()}")
    x_scale, weights = coefficients.tensors()
    return run_linear_multistep(denoiser, x, sigmas[:-1], x_scale, weights, basis=basis, cond=cond,
                                callback=callback, progress=progress)
