"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
of Diffusion Models", arXiv 2302.04867): the multistep UniP/UniC pair with the B(h) variants
and data prediction, in log-SNR time.

Notation as in ``dpm_solver.py``: lambda = log(alpha / sigma), one update goes from level s
to the next level t, h = lambda_t - lambda_s > 0, and the probability-flow ODE has the
exact solution

    x_t = sigma_t / sigma_s x_s + alpha_t int_0^h e^{u - h} x0_hat(lambda_s + u) du.

With x0_hat(lambda_s + u) = sum_k u^k / k! D^(k), integration by parts gives

    int_0^h e^{u - h} u^k / k! du = h^k c_{k+1} / k!,   c_1 = -expm1(-h),  c_{k+1} = 1 - k c_k / h

(c_1, c_2, c_3 are ``dpm_solver``'s), so x_t = sigma_t / sigma_s x_s + alpha_t sum_k h^k
c_{k+1} D^(k) / k!. UniPC does not estimate the derivatives one by one; it takes divided
differences to the earlier data predictions m_j = x0_hat(lambda_j), with the ratios
r_j = (lambda_j - lambda_s) / h (< 0 for the history, 1 for the new level t),

    D_j = (m_j - m_0) / r_j = sum_{k>=1} r_j^{k-1} h^k / k! D^(k),

and one update  x_t = sigma_t / sigma_s x_s + alpha_t (c_1 m_0 + B(h) sum_j a_j D_j)  with
B(h) = h ("bh1") or B(h) = c_1 = 1 - e^{-h} ("bh2"). Matching the h^k D^(k) terms for
k = 1..K gives the paper's order conditions, a K x K linear system in this notation:

    sum_j a_j r_j^{k-1} = b_k = c_{k+1} / B(h),      k = 1..K.

* UniP-p (predictor, order p): the p - 1 differences to the history, K = p - 1.
* UniC-p (corrector): the same p - 1 differences plus D_t = m_t - m_0 from the network's
  evaluation at the predicted x_t, K = p; it raises the order to p + 1. That evaluation is
  the one the next step needs anyway (the history keeps m_t at the *predicted* point), so
  the corrector costs no network evaluation: NFE = steps - 1 + denoise, as DPM-Solver.

With one difference (K = 1) UniPC takes a_1 = 1/2, the h -> 0 limit of b_1 = c_2 / B(h)
(it keeps the order); then UniP-2 with bh2 is exactly DPM-Solver++ 2M. The last update to
the data (lambda = +inf) is x0_hat itself, and the corrector is skipped where its result is
not used again (before that update, or after the last one with ``denoise=False``), as the
reference implementation does. ``lower_order_final`` caps the order at the updates left;
``corrector=False`` runs UniP-p alone.

Checks (tests/test_samplers.py): convergence to dopri5's solution on a Gaussian mixture at
order p + 1 for UniPC-p; agreement with diffusers' ``UniPCMultistepScheduler`` on its levels
with exact Gaussian eps (reference numbers kept in the test) for orders 1-3, bh1 and bh2;
without the corrector, UniP-2 bh2 gives the draws of ``dpm_solver`` order 2 to float rounding.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from sde.samplers import dpm_solver
from sde.samplers.common import Callback, Denoiser, NoiseGrid, NoiseSource, report
from sde.samplers.spec import DISCRETE, Option, SamplerSpec, register, first_order_nfe

Tensor = torch.Tensor

ORDERS = dpm_solver.ORDERS
VARIANTS = ("bh1", "bh2")


def difference_weights(h: float, r: list[float], variant: str) -> tuple[float, list[float]]:
    """B(h) and the weights a_j of the divided differences at the ratios ``r`` (see above)."""
    c = [-math.expm1(-h)]
    for k in range(1, len(r) + 1):
        c.append(1.0 - k * c[-1] / h)
    b_of_h = h if variant == "bh1" else c[0]
    if len(r) == 1:
        return b_of_h, [0.5]
    powers = np.array([[r_j ** k for r_j in r] for k in range(len(r))])
    rhs = np.array(c[1:]) / b_of_h
    return b_of_h, np.linalg.solve(powers, rhs).tolist()


def _update(x_s: Tensor, history: list[Tensor], log_snr: list[float], i: int, order: int,
            variant: str, alpha_t: float, sigma_s: float, sigma_t: float,
            m_t: Tensor | None = None) -> Tensor:
    """x at level i + 1 from x_s at level i: UniP-order, or UniC-order given ``m_t``."""
    h = log_snr[i + 1] - log_snr[i]
    m_0 = history[-1]
    ratios = [(log_snr[i - j] - log_snr[i]) / h for j in range(1, order)]
    differences = [(history[-1 - j] - m_0) / r_j for j, r_j in enumerate(ratios, start=1)]
    if m_t is not None:
        ratios.append(1.0)
        differences.append(m_t - m_0)
    x_t = sigma_t / sigma_s * x_s + alpha_t * -math.expm1(-h) * m_0
    if differences:
        b_of_h, weights = difference_weights(h, ratios, variant)
        x_t = x_t + alpha_t * b_of_h * sum(a * d for a, d in zip(weights, differences))
    return x_t


def unipc(model: Denoiser, x: Tensor, grid: NoiseGrid, *, sde, noise: NoiseSource,
          callback: Callback | None = None, disable: bool = False, order: int = 2,
          variant: str = "bh2", lower_order_final: bool = True, corrector: bool = True) -> Tensor:
    """UniPC multistep (UniP-p predictor + UniC-p corrector); see the module docstring.
    ``corrector=False`` leaves the predictor alone (UniP-p, order p): an ablation, and the
    check that UniP-2 with bh2 is DPM-Solver++ 2M."""
    log_snr = grid.log_snr.tolist()
    history: list[Tensor] = []  # data predictions at the previous levels, newest last
    previous: tuple[Tensor, int] | None = None  # (x at the previous level, the order used)
    n_updates = len(grid) - 1
    for i in tqdm(range(n_updates), disable=disable, desc="unipc"):
        t, alpha_t, sigma_t = grid.level(i)
        s, alpha_s, sigma_s = grid.level(i + 1)
        x0, _ = model(x, t, alpha_t, sigma_t)
        if sigma_s == 0:
            x = x0
        else:
            if corrector and previous is not None:  # UniC: correct x at level i with its x0
                x_before, step_order = previous
                _, _, sigma_before = grid.level(i - 1)
                x = _update(x_before, history, log_snr, i - 1, step_order, variant,
                            alpha_t, sigma_before, sigma_t, m_t=x0)
            history = (history + [x0])[-order:]
            step_order = min(order, len(history))
            if lower_order_final:
                step_order = min(step_order, n_updates - i)
            previous = (x, step_order)
            x = _update(x, history, log_snr, i, step_order, variant, alpha_s, sigma_t, sigma_s)
        report(callback, i, s, x, x0)
    return x


SAMPLERS = register(SamplerSpec(
    name="unipc", fn=unipc,
    options={"order": Option(2, int, "order p of the predictor (the corrector is of order p + 1)",
                             choices=ORDERS),
             "variant": Option("bh2", str, "B(h) = h (bh1) or 1 - e^-h (bh2)", choices=VARIANTS),
             "lower_order_final": dpm_solver.LOWER_ORDER_FINAL,
             "corrector": Option(True, bool, "apply the UniC corrector (False: UniP alone)"),
             "discrete": DISCRETE},
    nfe=first_order_nfe, schedule="log_snr", grid="option",
    reference="Zhao et al. 2023, UniPC (UniP-p predictor, UniC-p corrector)"))
