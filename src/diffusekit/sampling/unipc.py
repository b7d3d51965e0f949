"""UniPC (Zhao et al. 2023): a multistep predictor (UniP) and a corrector (UniC) that reuses the
model evaluation at the predicted point, so the corrector costs no extra model evaluation.

Data prediction in sigma space, with lambda = -log(sigma) and h = lambda_next - lambda:

    x_next = (sigma_next / sigma) x - expm1(-h) D_0 - B(h) sum_k rho_k (D_k - D_0) / r_k

where r_k = (lambda_k - lambda) / h for the earlier steps' outputs D_k, and B(h) = -h ("bh1") or
expm1(-h) ("bh2"). The rho_k solve the order conditions (UniPC's Theorem 3.1); the corrector adds
the new output D(x_next) with r = 1, raising the order by one.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import trange

from .common import check_option, check_sigmas, denoise, report
from .registry import register


def _unipc_update(x: Tensor, outputs: list[Tensor], lambdas: list[float], sigmas: list[float], i: int,
                  order: int, variant: str, model_next: Tensor | None = None) -> Tensor:
    """UniP (model_next None) or UniC step of `order` from sigmas[i] to sigmas[i + 1] > 0;
    outputs[-1] is D at sigmas[i], outputs[-1 - k] at sigmas[i - k]."""
    h = lambdas[i + 1] - lambdas[i]
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rks = [(lambdas[i - k] - lambdas[i]) / h for k in range(1, order)] + [1.0]
    d1s = [(outputs[-1 - k] - outputs[-1]) / rks[k - 1] for k in range(1, order)]
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r_matrix = np.array([[r**j for r in rks] for j in range(order)])
    x_next = (sigmas[i + 1] / sigmas[i]) * x - h_phi_1 * outputs[-1]
    if model_next is None:  # predictor: order conditions without the new point
        rhos = [0.5] if order == 2 else np.linalg.solve(r_matrix[:-1, :-1], b[:-1]) if order > 2 else []
        terms = [rho * d for rho, d in zip(rhos, d1s)]
    else:  # corrector
        rhos = [0.5] if order == 1 else np.linalg.solve(r_matrix, b)
        terms = [rho * d for rho, d in zip(rhos[:-1], d1s)] + [rhos[-1] * (model_next - outputs[-1])]
    return x_next - b_h * sum(terms) if terms else x_next


@register("unipc", nfe=lambda n: n - 1, stochastic=False)
@torch.no_grad()
def unipc(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, progress=False,
          cond: dict | None = None, order: int = 2, variant: str = "bh2", corrector: bool = True,
          final_corrector: bool = False, lower_order_final: bool = True) -> Tensor:
    """UniPC (diffusers' UniPCMultistepScheduler, data prediction): UniP of `order` (1-3) then UniC
    at every following noise level, `variant` "bh1" or "bh2". The order ramps up over the first
    steps and, with `lower_order_final`, down to the number of steps left; the step to sigma = 0 is
    x = D(x). The corrector at the last nonzero level only pays off if the model is evaluated again
    at the corrected point: `final_corrector=True` does that (one more evaluation).
    NFE = len(sigmas) - 1 (+1 with final_corrector)."""
    sigmas = check_sigmas(x, sigmas).tolist()
    check_option("order", order, (1, 2, 3))
    check_option("variant", variant, ("bh1", "bh2"))
    n = len(sigmas) - 1
    lambdas = [-math.log(s) for s in sigmas[:-1]]
    outputs: list[Tensor] = []
    x_last, order_last = None, 0
    for i in trange(n, disable=not progress, desc="unipc"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(denoiser, x, sigma, cond)
        if corrector and x_last is not None and (sigma_next > 0 or final_corrector):
            x = _unipc_update(x_last, outputs, lambdas, sigmas, i - 1, order_last, variant, denoised)
            if sigma_next == 0:
                denoised = denoise(denoiser, x, sigma, cond)
        outputs = (outputs + [denoised])[-order:]
        order_last = min(order, len(outputs), n - i) if lower_order_final else min(order, len(outputs))
        x_last = x
        x = denoised if sigma_next == 0 else _unipc_update(x, outputs, lambdas, sigmas, i, order_last, variant)
        report(callback, i, x, sigma, sigma_next, denoised)
    return x
