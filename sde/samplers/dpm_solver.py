"""DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++", Algorithm 2) in log-SNR time.

With data prediction x0_hat and lambda = log(alpha / sigma), the probability-flow ODE has
the exact solution (their eq. 9) from level s to the next level t, h = lambda_t - lambda_s:

    x_t = sigma_t / sigma_s x_s + alpha_t int_0^h e^{u - h} x0_hat(lambda_s + u) du.

A Taylor expansion x0_hat(lambda_s + u) = D + u D' + u^2/2 D'' integrates to

    x_t = sigma_t / sigma_s x_s + alpha_t (c1 D + c2 h D' + c3 h^2 D'' / 2),
    c1 = -expm1(-h),  c2 = 1 - c1 / h,  c3 = 1 - 2 c2 / h

(c_k = h^{1-k} int_0^h e^{u-h} u^{k-1} du), and the multistep solvers estimate the
derivatives from the data predictions D0, D1, D2 at the last levels, with step ratios
r0 = h0 / h, r1 = h1 / h (h0, h1 the previous log-SNR steps):

  order 1   x_t = sigma_t / sigma_s x_s + alpha_t c1 D0              (= DDIM, eta = 0)
  order 2   D = (1 + 1/(2 r0)) D0 - 1/(2 r0) D1,
            x_t = sigma_t / sigma_s x_s + alpha_t c1 D                (Algorithm 2, "2M")
  order 3   d0 = (D0 - D1) / r0,  d1 = (D1 - D2) / r1,
            h^2 D'' ~ 2 (d0 - d1) / (r0 + r1),  h D' ~ d0 + r0 / (r0 + r1) (d0 - d1)
            in the Taylor form above ("3M").

Divided differences: d0 = h D' - h h0 D''/2 + O(h^3) and d1 = h D' - h (2 h0 + h1) D''/2
+ O(h^3), so d0 - d1 = h (h0 + h1) D''/2: the second-derivative estimate carries the factor
2 written above. (The reference code's 3M, and diffusers', use (d0 - d1) / (r0 + r1) =
h^2 D''/2 against the same phi_3 = -c3/2 coefficient, which halves the D'' term and
leaves a local error O(h^3), i.e. a globally second-order method; tests/test_samplers.py
measures order 3 for the form here.)

The first steps use the orders the history allows (1, then 2). The last update to the
data (lambda = +inf) is always first order, where it is exactly x0_hat at eps.
``lower_order_final`` additionally caps the order at the number of updates left (as
dpm-solver's ``lower_order_final``), which keeps 3M stable at small step counts.

Default order 2 (2M): on the sharp mixtures of ``bench/sampler_schedules.py`` at 10-20 NFE
3M is not better on the whole, and without ``lower_order_final`` it is unstable on some
schedules (BENCHMARKS.md).

``dpm_solver_sde`` is the stochastic counterpart (Lu et al. 2022, "DPM-Solver++", App. B,
SDE-DPM-Solver++; k-diffusion's ``sample_dpmpp_2m_sde``). It solves the family of reverse
SDEs that share the forward marginals (Song et al. 2021, eq. 6, for eta = 1;
Karras et al. 2022, eq. 6, with beta(t) = eta sigma'(t) / sigma(t) in their variables),

    dx = [f(t) x - (1 + eta) / 2 g(t)^2 score(x, t)] dt + sqrt(eta) g(t) dw_bar,

where ``eta`` is the fraction of the diffusion g^2 kept: eta = 1 is the reverse SDE (eq. 6,
the default), eta = 0 the probability-flow ODE, eta > 1 injects more noise than the reverse
SDE and leans harder on the latest data prediction. Written with the data prediction in
log-SNR time (g^2 dt = -2 sigma^2 dlambda), the SDE is linear in x given x0_hat, and its
exact solution from level s to t (h = lambda_t - lambda_s > 0) is

    x_t = sigma_t / sigma_s e^{-eta h} x_s
          + alpha_t int_0^h (1 + eta) e^{(1 + eta)(u - h)} x0_hat(lambda_s + u) du
          + sigma_t sqrt(1 - e^{-2 eta h}) z.

With x0_hat(lambda_s + u) = D + u D' the integral is c D + (h - c / (1 + eta)) D',
c = -expm1(-(1 + eta) h), and the one backward difference D' ~ (D0 - D1) / h0, h0 = r0 h,
gives

  order 1   x_t = sigma_t / sigma_s e^{-eta h} x_s + alpha_t c D0 + sigma_t sqrt(1 - e^{-2 eta h}) z
            (eta = 1: DDIM with eta = 1, the ancestral step with the posterior variance;
            eta = 0: DDIM with eta = 0; in between the two families differ, DDIM's noise
            being eta sigma_t sqrt(1 - e^{-2h}))
  order 2   ... + alpha_t w (D0 - D1) / r0                                  ("2M SDE")

with one of two weights w of the backward difference, both (1 + eta) h / 2 + O(h^2), so on
the O(h) difference they differ by O(h^3) per step and the method keeps its order; they part
at the large log-SNR steps of a 10-step grid:

  solver_type="midpoint" (default)  w = c / 2, the weighting of k-diffusion's
      ``sample_dpmpp_2m_sde`` and of diffusers' ``sde-dpmsolver++``, the default of both;
      at eta = 0 it is DPM-Solver++ 2M (``dpm_solver``) exactly;
  solver_type="heun"                w = 1 - c / ((1 + eta) h), the exact integral of the
      linear interpolation (k-diffusion's name for it; its ``eta`` is this one).

For exact x0_hat = x0 the step maps alpha_s x0 + sigma_s z to alpha_t x0 + sigma_t z' for
every eta: the mean coefficient is e^{-(1 + eta) h} + c = 1 and the variance
e^{-2 eta h} + (1 - e^{-2 eta h}) = 1. The update to the data (h = +inf) is first order,
x_t = D0. tests/test_samplers.py checks the weak order on Gaussian data and both weightings
against diffusers' sde-dpmsolver++ draws on its levels with the same noise. On the released
MNIST model midpoint has the lower FID at few steps (BENCHMARKS.md, sampler quality), hence
the default.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from sde.samplers.common import Callback, Denoiser, NoiseGrid, NoiseSource, report
from sde.samplers.spec import DISCRETE, Option, SamplerSpec, register, first_order_nfe

Tensor = torch.Tensor

ORDERS = (1, 2, 3)
#: Orders of ``dpm_solver_sde`` (one backward difference: no third order derived here).
SDE_ORDERS = (1, 2)
#: How ``dpm_solver_sde`` weights its backward difference (see the module docstring).
SDE_SOLVER_TYPES = ("midpoint", "heun")


def dpm_solver(model: Denoiser, x: Tensor, grid: NoiseGrid, *, sde, noise: NoiseSource,
               callback: Callback | None = None, disable: bool = False, order: int = 2,
               lower_order_final: bool = True) -> Tensor:
    """DPM-Solver++ multistep, Lu et al. 2022 Algorithm 2 (order 2) and its order-3 variant."""
    log_snr = grid.log_snr.tolist()
    history: list[Tensor] = []  # data predictions at the previous levels, newest last
    n_updates = len(grid) - 1
    for i in tqdm(range(n_updates), disable=disable, desc="dpm_solver"):
        t, alpha_t, sigma_t = grid.level(i)
        s, alpha_s, sigma_s = grid.level(i + 1)
        x0, _ = model(x, t, alpha_t, sigma_t)
        history = (history + [x0])[-3:]
        if sigma_s == 0:
            x = x0
        else:
            step_order = min(order, len(history))
            if lower_order_final:
                step_order = min(step_order, n_updates - i)
            h = log_snr[i + 1] - log_snr[i]
            c1 = -math.expm1(-h)
            if step_order == 1:
                x0_term = c1 * x0
            elif step_order == 2:
                r0 = (log_snr[i] - log_snr[i - 1]) / h
                x0_term = c1 * ((1 + 0.5 / r0) * history[-1] - 0.5 / r0 * history[-2])
            else:
                r0 = (log_snr[i] - log_snr[i - 1]) / h
                r1 = (log_snr[i - 1] - log_snr[i - 2]) / h
                d0 = (history[-1] - history[-2]) / r0
                d1 = (history[-2] - history[-3]) / r1
                h2_curvature = 2.0 * (d0 - d1) / (r0 + r1)   # h^2 D''
                h_slope = d0 + r0 / (r0 + r1) * (d0 - d1)     # h D'
                c2 = 1.0 - c1 / h
                c3 = 1.0 - 2.0 * c2 / h
                x0_term = c1 * history[-1] + c2 * h_slope + 0.5 * c3 * h2_curvature
            x = sigma_s / sigma_t * x + alpha_s * x0_term
        report(callback, i, s, x, x0)
    return x


def dpm_solver_sde(model: Denoiser, x: Tensor, grid: NoiseGrid, *, sde, noise: NoiseSource,
                   callback: Callback | None = None, disable: bool = False, order: int = 2,
                   eta: float = 1.0, solver_type: str = "midpoint") -> Tensor:
    """SDE-DPM-Solver++ (Lu et al. 2022, App. B), orders 1 and 2M, with the diffusion fraction
    ``eta`` of the reverse-SDE family; see the module docstring."""
    log_snr = grid.log_snr.tolist()
    previous: Tensor | None = None  # the data prediction at the previous level
    for i in tqdm(range(len(grid) - 1), disable=disable, desc="dpm_solver_sde"):
        t, alpha_t, sigma_t = grid.level(i)
        s, alpha_s, sigma_s = grid.level(i + 1)
        x0, _ = model(x, t, alpha_t, sigma_t)
        if sigma_s == 0:
            x = x0
        else:
            h = log_snr[i + 1] - log_snr[i]
            c = -math.expm1(-(1.0 + eta) * h)
            x0_term = c * x0
            if order == 2 and previous is not None:
                r0 = (log_snr[i] - log_snr[i - 1]) / h
                weight = 0.5 * c if solver_type == "midpoint" else 1.0 - c / ((1.0 + eta) * h)
                x0_term = x0_term + weight / r0 * (x0 - previous)
            x = sigma_s / sigma_t * math.exp(-eta * h) * x + alpha_s * x0_term
            if eta > 0:
                x = x + sigma_s * math.sqrt(-math.expm1(-2.0 * eta * h)) * noise.randn(x.shape)
        previous = x0
        report(callback, i, s, x, x0)
    return x


LOWER_ORDER_FINAL = Option(True, bool, "lower the order on the last steps (stabler at few steps)")

SAMPLERS = register(
    SamplerSpec(
        name="dpm_solver", fn=dpm_solver,
        options={"order": Option(2, int, "multistep order", choices=ORDERS),
                 "lower_order_final": LOWER_ORDER_FINAL, "discrete": DISCRETE},
        nfe=first_order_nfe, schedule="log_snr", grid="option",
        reference="Lu et al. 2022, DPM-Solver++ Alg. 2 (2M) and 3M"),
    SamplerSpec(
        name="dpm_solver_sde", fn=dpm_solver_sde,
        options={"order": Option(2, int, "multistep order", choices=SDE_ORDERS),
                 "eta": Option(1.0, float, "noise: 1 the reverse SDE, 0 the probability-flow ODE, > 1 "
                                           "more noise than the reverse SDE", valid=lambda eta: eta >= 0,
                               accepted="be >= 0 (1: the reverse SDE, 0: the probability-flow ODE)"),
                 "solver_type": Option("midpoint", str, "weight of the backward difference",
                                       choices=SDE_SOLVER_TYPES),
                 "discrete": DISCRETE},
        nfe=first_order_nfe, schedule="log_snr", stochastic=lambda options: options["eta"] > 0,
        grid="option", reference="Lu et al. 2022, SDE-DPM-Solver++ (2M); Karras et al. 2022, eq. 6"),
)
