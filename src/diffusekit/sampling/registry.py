"""The one registry of samplers, filled by the `@register` decorator in each sampler module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class SamplerInfo:
    name: str
    fn: Callable
    nfe: Callable[[int], int | None]  # model evaluations for len(sigmas) = n; None: data-dependent
    stochastic: bool

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0]


SAMPLERS: dict[str, SamplerInfo] = {}


def register(name: str, *, nfe: Callable[[int], int | None], stochastic: bool):
    def wrap(fn):
        if name in SAMPLERS:
            raise RuntimeError(f"sampler {name!r} registered twice")
        SAMPLERS[name] = SamplerInfo(name, fn, nfe, stochastic)
        return fn

    return wrap


def get_sampler(name: str) -> SamplerInfo:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]
