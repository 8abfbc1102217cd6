"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) over the SDE's discrete chain.

The chain visits discrete steps t_i = T i / N with the SDE's tables (``discrete_alpha_sigma``:
Ho et al.'s alphas_cumprod on VP). With ``steps == N`` it is Ho et al.'s chain itself;
with fewer steps it is the respaced chain of Nichol & Dhariwal 2021, sec. 4, whose
betas are recomputed from the alphas_cumprod ratios of consecutive visited steps.
Between consecutive levels t > s, in terms of the marginals x_t = alpha_t x0 + sigma_t z:

    a_ts    = alpha_t / alpha_s                     (= sqrt(1 - beta_t) on VP)
    beta_ts = sigma_t^2 - a_ts^2 sigma_s^2          (= 1 - alphabar_t / alphabar_s on VP)

and the step of Algorithm 2 (Ho et al. eq. 11, the posterior mean of their eq. 7) is

    x_s = (x_t - beta_ts / sigma_t * eps_hat) / a_ts + sqrt(var_ts) z

with var_ts = beta_ts (``variance="beta"``, Ho's sigma_t^2 = beta_t, defined only for a
DDPM beta chain) or the posterior variance beta_tilde_ts = beta_ts sigma_s^2 / sigma_t^2
(``variance="beta_tilde"``, any SDE). The last step goes to the data without noise (z = 0
at t = 1 in Algorithm 2), where the step reduces to x0_hat.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from sde.samplers.common import Callback, Denoiser, NoiseGrid, NoiseSource, report
from sde.samplers.spec import Option, SamplerSpec, register, always, first_order_nfe

Tensor = torch.Tensor

VARIANCES = ("beta_tilde", "beta")


def check_options(options: dict, sde, given: set) -> None:
    if options["variance"] == "beta" and not sde.supports_ddpm_betas():
        raise ValueError(f"variance='beta' needs a DDPM beta chain, which {sde!r} does not have "
                         "(supported: VPSDE); use variance='beta_tilde'")


def ancestral_step(x: Tensor, eps: Tensor, level_t: tuple[float, float, float],
                   level_s: tuple[float, float, float], noise: NoiseSource,
                   variance: str = "beta_tilde") -> Tensor:
    """One step of Algorithm 2 from level t to level s < t, each given as (time, alpha, sigma)."""
    _, alpha_t, sigma_t = level_t
    _, alpha_s, sigma_s = level_s
    a_ts = alpha_t / alpha_s
    beta_ts = sigma_t ** 2 - a_ts ** 2 * sigma_s ** 2
    x = (x - beta_ts / sigma_t * eps) / a_ts
    if sigma_s > 0:
        var_ts = beta_ts if variance == "beta" else beta_ts * sigma_s ** 2 / sigma_t ** 2
        x = x + var_ts ** 0.5 * noise.randn(x.shape)
    return x


def ancestral(model: Denoiser, x: Tensor, grid: NoiseGrid, *, sde, noise: NoiseSource,
              callback: Callback | None = None, disable: bool = False,
              variance: str = "beta_tilde") -> Tensor:
    """DDPM ancestral sampling, Ho et al. 2020 Algorithm 2 (respacing: Nichol & Dhariwal sec. 4)."""
    for i in tqdm(range(len(grid) - 1), disable=disable, desc="ancestral"):
        level_t, level_s = grid.level(i), grid.level(i + 1)
        x0, eps = model(x, *level_t)
        x = ancestral_step(x, eps, level_t, level_s, noise, variance)
        report(callback, i, level_s[0], x, x0)
    return x


SAMPLERS = register(SamplerSpec(
    name="ancestral", fn=ancestral,
    options={"variance": Option("beta_tilde", str, "the step's noise variance: the posterior's "
                                                   "beta_tilde, or beta (VP only)", choices=VARIANCES)},
    nfe=first_order_nfe, schedule="quadratic", stochastic=always, grid="discrete",
    check=check_options, reference="Ho et al. 2020, Alg. 2; Nichol & Dhariwal 2021, sec. 4"))
