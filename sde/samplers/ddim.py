"""DDIM (Song, Meng, Ermon 2021, eq. 12), written for any x_t = alpha_t x0 + sigma_t z.

From level t to the next level s of the grid, with x0_hat and eps_hat the network's
estimates at t:

    x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c_ts^2) eps_hat + c_ts z
    c_ts = eta * sqrt(sigma_s^2 / sigma_t^2 * (sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2))

(their eq. 16 on VP, where the bracket is 1 - alphabar_t / alphabar_s). eta = 0 is the
deterministic DDIM, eta = 1 the DDPM ancestral sampler with the posterior variance
beta_tilde (on the same discrete grid, ``discrete=True``, it reproduces ``ancestral``).

First and last evaluations: the network is evaluated at every level of the grid except
the data, so the first evaluation is at t = T (x_T itself) and the last at t = eps; the
last update then goes to the data (alpha = 1, sigma = 0, i.e. the paper's alphabar_0 = 1),
where it is x0_hat at eps. With ``denoise=False`` the sampler stops at eps and the last
evaluation is at the level before it.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from sde.samplers.common import Callback, Denoiser, NoiseGrid, NoiseSource, report
from sde.samplers.spec import DISCRETE, Option, SamplerSpec, register, first_order_nfe

Tensor = torch.Tensor

#: the DDIM paper's name for the schedule, and the spacings it defines (App. D.2).
SPACINGS = ("uniform", "quadratic")


def check_options(options: dict, sde, given: set) -> None:
    """Also resolves ``spacing``, the DDIM paper's name for the schedule, into ``schedule``."""
    if "spacing" in given and options["spacing"] is not None:
        if "schedule" in given:
            raise ValueError("give either spacing (the DDIM paper's name) or schedule, not both")
        options["schedule"] = options["spacing"]


def ddim(model: Denoiser, x: Tensor, grid: NoiseGrid, *, sde, noise: NoiseSource,
         callback: Callback | None = None, disable: bool = False, eta: float = 0.0) -> Tensor:
    """DDIM, Song, Meng, Ermon 2021, eq. 12 with the eta-family of eq. 16."""
    for i in tqdm(range(len(grid) - 1), disable=disable, desc="ddim"):
        t, alpha_t, sigma_t = grid.level(i)
        s, alpha_s, sigma_s = grid.level(i + 1)
        x0, eps = model(x, t, alpha_t, sigma_t)
        a_ts = alpha_t / alpha_s
        c_ts = eta * (sigma_s ** 2 / sigma_t ** 2 * (sigma_t ** 2 - a_ts ** 2 * sigma_s ** 2)) ** 0.5
        x = alpha_s * x0 + (sigma_s ** 2 - c_ts ** 2) ** 0.5 * eps
        if c_ts > 0:
            x = x + c_ts * noise.randn(x.shape)
        report(callback, i, s, x, x0)
    return x


SAMPLERS = register(SamplerSpec(
    name="ddim", fn=ddim,
    options={"eta": Option(0.0, float, "noise of the eta-family: 0 deterministic DDIM, 1 the "
                                       "ancestral posterior", valid=lambda eta: 0.0 <= eta <= 1.0,
                           accepted="lie in [0, 1]"),
             "spacing": Option(None, str, "the DDIM paper's name for the schedule", choices=SPACINGS),
             "discrete": DISCRETE},
    nfe=first_order_nfe, schedule="quadratic", stochastic=lambda options: options["eta"] > 0,
    grid="option", check=check_options, reference="Song, Meng & Ermon 2021, eq. 12 and 16"))
