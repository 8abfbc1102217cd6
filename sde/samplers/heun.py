"""Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1).

Karras et al. write the ODE for x_t = s(t) (x0 + sigma(t) z). Ours is x_t = alpha_t x0 +
sigma_t z, i.e. s = alpha and their sigma is sigma_K = sigma / alpha = exp(-lambda). In the
scaled variable x_K = x / alpha (their eq. 4 change of variables) the probability-flow
ODE (their eq. 1 with s = 1) reads

    d x_K / d sigma_K = (x_K - D(x_K; sigma_K)) / sigma_K = eps_hat(x, t),

and Algorithm 1 with their sigma(t) = t, s(t) = 1 steps it over the grid's sigma_K levels:
an Euler step, then the trapezoidal (Heun) correction with eps_hat at the Euler point,
except on the last step to sigma_K = 0 (the data), which stays an Euler step - it is
exactly x0_hat at eps. NFE = 2 * steps - 1 with ``denoise``, 2 * (steps - 1) without.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from sde.samplers.common import Callback, Denoiser, NoiseGrid, NoiseSource, report
from sde.samplers.spec import DISCRETE, SamplerSpec, register

Tensor = torch.Tensor


def heun(model: Denoiser, x: Tensor, grid: NoiseGrid, *, sde, noise: NoiseSource,
         callback: Callback | None = None, disable: bool = False) -> Tensor:
    """Deterministic Heun sampler, Karras et al. 2022 Algorithm 1 (in x / alpha, sigma / alpha)."""
    sigma_karras = (grid.sigma / grid.alpha).tolist()
    for i in tqdm(range(len(grid) - 1), disable=disable, desc="heun"):
        t, alpha_t, sigma_t = grid.level(i)
        s, alpha_s, sigma_s = grid.level(i + 1)
        x0, eps = model(x, t, alpha_t, sigma_t)
        step = sigma_karras[i + 1] - sigma_karras[i]
        x_scaled = x / alpha_t + step * eps
        if sigma_s > 0:
            _, eps_next = model(alpha_s * x_scaled, s, alpha_s, sigma_s)
            x_scaled = x / alpha_t + step * 0.5 * (eps + eps_next)
        x = alpha_s * x_scaled
        report(callback, i, s, x, x0)
    return x


def nfe(steps: int, options: dict) -> int:
    """An Euler and a correction evaluation per step, the last step to the data Euler only."""
    return 2 * (steps - 1) + int(options["denoise"])


SAMPLERS = register(SamplerSpec(name="heun", fn=heun, options={"discrete": DISCRETE}, nfe=nfe,
                        schedule="quadratic", grid="option", reference="Karras et al. 2022, Alg. 1"))
