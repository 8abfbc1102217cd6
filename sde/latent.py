"""The latent space of the probability-flow ODE: encode, decode, reconstruct, interpolate.

The probability-flow ODE (Song et al. 2021, eq. 13) is a bijection between data at a small
time ``eps`` and latents at T. Encoding runs it forward (eps -> T), decoding backward
(T -> eps), with the same solver on the same grid, so decode(encode(x)) = x up to the
solver's error, which falls to zero as the steps grow (DDIM paper, Song, Meng & Ermon 2021,
sec. 5.4, where the first-order case is called DDIM inversion).

Solvers (``METHODS``):

* ``"ddim"``: the first-order exponential integrator in the log-SNR lambda = log(alpha/sigma)
  (DPM-Solver-1, Lu et al. 2022, eq. 3.7), identical to deterministic DDIM:

      x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps(x_s, s),   h = lambda_t - lambda_s,

  valid for h > 0 (towards data) and h < 0 (towards noise): run backwards on the sampler's
  grid it is DDIM inversion. Global error O(1/steps).
* ``"dpm_solver_2"``: the singlestep second-order DPM-Solver (Lu et al. 2022, Algorithm 1 with
  r = 1/2): a first-order step to the log-SNR midpoint, then the full step with eps there.
  Two evaluations per step, global error O(1/steps^2). Being singlestep it needs no start-up
  (a multistep method would start with a first-order step and carry the previous eps; it
  inverts as well, but its first step bounds the error at first order).
* ``"adaptive"``: torchdiffeq's dopri5 on dx/dt = f(t) x + g(t)^2 / (2 sigma_t) eps(x, t) with
  ``rtol``/``atol``. ``likelihood.ode_log_likelihood`` with ``variable="t"`` integrates the same
  ODE, its step control also weighing the log-density; at tight tolerances the two latents
  agree (a test), at loose ones they differ by about the tolerance.

The fixed-step grids are uniform in lambda between eps and T. The stochastic samplers have no
inverse (their paths depend on fresh noise); every deterministic sampler of ``sde.samplers``
decodes a latent, but only these methods here are run in both directions on one grid.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from sde.network import CountedModel

Tensor = torch.Tensor

METHODS = ("ddim", "dpm_solver_2", "adaptive")
#: Evaluations per step of the fixed-step methods.
STAGES = {"ddim": 1, "dpm_solver_2": 2}
#: Where the data end of the ODE sits: the sampler's default smallest time. At smaller times
#: the trained network's ODE grows stiff and a fixed-step inversion needs more steps.
DEFAULT_EPS = 1e-3
DEFAULT_STEPS = 50
DEFAULT_TOLERANCE = 1e-5
INTERPOLATIONS = ("slerp", "lerp")


def check_options(sde, *, method: str, steps: int, eps: float, rtol: float, atol: float) -> None:
    """One ValueError on the first bad option (what was wrong and what is accepted)."""
    if method not in METHODS:
        raise ValueError(f"unknown latent method {method!r}; accepted: {', '.join(METHODS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not 0.0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, T={sde.T:g}), got {eps}")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}")


def log_snr_grid(sde, eps: float, steps: int) -> Tensor:
    """``steps + 1`` times from eps to T, uniform in lambda = log(alpha / sigma) (float64)."""
    ends = sde.log_snr(torch.tensor([eps, sde.T], dtype=torch.float64))
    times = sde.t_from_log_snr(torch.linspace(float(ends[0]), float(ends[1]), steps + 1, dtype=torch.float64))
    times[0], times[-1] = eps, sde.T  # exactly, not up to the inverse's rounding
    return times


def _coefficients(sde, t: float) -> tuple[float, float, float]:
    t_tensor = torch.tensor([t], dtype=torch.float64)
    alpha, sigma = float(sde.alpha(t_tensor)), float(sde.sigma(t_tensor))
    return alpha, sigma, math.log(alpha / sigma)


def _exponential_step(network: CountedModel, sde, x: Tensor, s: float, t: float, method: str) -> Tensor:
    """One step s -> t (either direction) of DPM-Solver-1 (DDIM) or singlestep DPM-Solver-2."""
    alpha_s, _, lambda_s = _coefficients(sde, s)
    alpha_t, sigma_t, lambda_t = _coefficients(sde, t)
    h = lambda_t - lambda_s
    eps_s = network(x, s)
    if method == "dpm_solver_2":
        middle = float(sde.t_from_log_snr(torch.tensor([lambda_s + h / 2], dtype=torch.float64)))
        alpha_m, sigma_m, _ = _coefficients(sde, middle)
        u = (alpha_m / alpha_s) * x - sigma_m * math.expm1(h / 2) * eps_s
        eps_s = network(u, middle)
    return (alpha_t / alpha_s) * x - sigma_t * math.expm1(h) * eps_s


def _solve(model, sde, x: Tensor, *, forward: bool, method: str, steps: int, eps: float,
           rtol: float, atol: float) -> tuple[Tensor, dict[str, Any]]:
    check_options(sde, method=method, steps=steps, eps=eps, rtol=rtol, atol=atol)
    network = CountedModel(model)
    x = x.to(torch.float64)
    with torch.no_grad():
        if method == "adaptive":
            def velocity(t: Tensor, x_t: Tensor) -> Tensor:
                sigma_t = float(sde.sigma(t))
                eps_hat = network(x_t, float(t))
                return float(sde.drift_coef(t)) * x_t + float(sde.diffusion_sq(t)) / (2.0 * sigma_t) * eps_hat

            span = torch.tensor([eps, sde.T] if forward else [sde.T, eps], dtype=torch.float64, device=x.device)
            # land on the end point rather than step past it (beyond T or below 0 the SDE may not exist)
            from torchdiffeq import odeint  # here, not at import: it loads scipy (start-up time)

            x = odeint(velocity, x, span, rtol=rtol, atol=atol, method="dopri5",
                       options={"step_t": span[1:]})[-1]
        else:
            times = log_snr_grid(sde, eps, steps).tolist()
            if not forward:
                times = times[::-1]
            for s, t in zip(times[:-1], times[1:]):
                x = _exponential_step(network, sde, x, s, t, method)
    info = {"nfe": network.nfe, "method": method, "steps": None if method == "adaptive" else steps,
            "eps": eps, **({"rtol": rtol, "atol": atol} if method == "adaptive" else {})}
    return x, info


def encode(model, sde, x: Tensor, *, method: str = "dpm_solver_2", steps: int = DEFAULT_STEPS,
           eps: float = DEFAULT_EPS, rtol: float = DEFAULT_TOLERANCE,
           atol: float = DEFAULT_TOLERANCE) -> tuple[Tensor, dict[str, Any]]:
    """x (data, taken as the state at ``eps``) -> its latent x_T by the probability-flow ODE.

    Returns (x_T in float64, info) with info["nfe"] the network evaluations (per sample).
    ``steps`` applies to the fixed-step methods, ``rtol``/``atol`` to ``"adaptive"``."""
    return _solve(model, sde, x, forward=True, method=method, steps=steps, eps=eps, rtol=rtol, atol=atol)


def decode(model, sde, z: Tensor, *, method: str = "dpm_solver_2", steps: int = DEFAULT_STEPS,
           eps: float = DEFAULT_EPS, rtol: float = DEFAULT_TOLERANCE,
           atol: float = DEFAULT_TOLERANCE) -> tuple[Tensor, dict[str, Any]]:
    """A latent x_T -> the data at ``eps``: ``encode``'s inverse on the same grid (float64)."""
    return _solve(model, sde, z, forward=False, method=method, steps=steps, eps=eps, rtol=rtol, atol=atol)


def reconstruction_error(x: Tensor, reconstruction: Tensor, data_range: float = 2.0) -> dict[str, Any]:
    """Per-sample RMSE over all values and PSNR = 20 log10(data_range / RMSE) (images on
    [-1, 1]: range 2), with their means (the PSNR mean is over samples, in dB)."""
    difference = (reconstruction.to(torch.float64) - x.to(torch.float64)).flatten(1)
    rmse = difference.pow(2).mean(1).sqrt()
    psnr = 20 * torch.log10(data_range / rmse.clamp_min(1e-300))
    return {"rmse": rmse.tolist(), "psnr": psnr.tolist(), "rmse_mean": float(rmse.mean()),
            "psnr_mean": float(psnr.mean())}


def reconstruct(model, sde, x: Tensor, **options) -> tuple[Tensor, dict[str, Any]]:
    """decode(encode(x)) with the same ``options``; info: the latent, NFE of each way, the
    per-sample error (``reconstruction_error``)."""
    z, encoded = encode(model, sde, x, **options)
    back, decoded = decode(model, sde, z, **options)
    return back, {"x_T": z, "nfe_encode": encoded["nfe"], "nfe_decode": decoded["nfe"],
                  **{key: value for key, value in encoded.items() if key != "nfe"},
                  **reconstruction_error(x, back)}


def slerp(z0: Tensor, z1: Tensor, weights: Tensor) -> Tensor:
    """Spherical interpolation per pair of latents (DDIM paper, sec. 5.4; Shoemake 1985):
    sin((1 - w) theta) / sin(theta) z0 + sin(w theta) / sin(theta) z1 with theta the angle
    between z0 and z1. For Gaussian latents in high dimension both ends have norm near
    sqrt(D) and nearly orthogonal, and slerp stays at that norm where lerp shrinks it by
    up to sqrt(2). z0, z1: [...]; weights [K]; returns [K, ...]."""
    a, b = z0.flatten().to(torch.float64), z1.flatten().to(torch.float64)
    norms = a.norm() * b.norm()
    if float(norms) == 0.0:  # a zero latent has no direction: the arc is not defined
        return lerp(z0, z1, weights)
    theta = torch.arccos(torch.clamp(a @ b / norms, -1.0, 1.0))
    w = weights.to(device=a.device, dtype=torch.float64)[:, None]
    if float(torch.sin(theta)) < 1e-12:  # (anti)parallel: the arc is not defined, fall back to lerp
        return lerp(z0, z1, weights)
    mixed = (torch.sin((1 - w) * theta) * a + torch.sin(w * theta) * b) / torch.sin(theta)
    return mixed.reshape(len(weights), *z0.shape)


def lerp(z0: Tensor, z1: Tensor, weights: Tensor) -> Tensor:
    """(1 - w) z0 + w z1 for each weight: [K, ...]."""
    w = weights.to(device=z0.device, dtype=torch.float64).reshape(-1, *([1] * z0.ndim))
    return (1 - w) * z0.to(torch.float64)[None] + w * z1.to(torch.float64)[None]


def interpolate(model, sde, x0: Tensor, x1: Tensor, *, frames: int = 9, kind: str = "slerp",
                **options) -> tuple[Tensor, dict[str, Any]]:
    """Decoded interpolation between the latents of two samples x0, x1 (shape [...] each):
    ``frames`` points from x0's latent to x1's (both ends included), by ``kind`` ("slerp" or
    "lerp"). Returns ([frames, ...] at eps, info with the NFE of encoding and decoding)."""
    if kind not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {kind!r}; accepted: {', '.join(INTERPOLATIONS)}")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise ValueError(f"frames must be an integer >= 2, got {frames!r}")
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have one shape, got {list(x0.shape)} and {list(x1.shape)}")
    latents, encoded = encode(model, sde, torch.stack([x0, x1]), **options)
    weights = torch.linspace(0.0, 1.0, frames, dtype=torch.float64, device=latents.device)
    path = (slerp if kind == "slerp" else lerp)(latents[0], latents[1], weights)
    decoded, info = decode(model, sde, path, **options)
    return decoded, {"nfe_encode": encoded["nfe"], "nfe_decode": info["nfe"], "kind": kind,
                     **{key: value for key, value in info.items() if key != "nfe"}}
