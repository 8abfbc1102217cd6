"""Reverse-time SDE samplers (Song et al. 2021, "Score-Based Generative Modeling through SDEs").

The reverse SDE (their eq. 6) of dx = f(t) x dt + g(t) dw is

    dx = [f(t) x - g(t)^2 score(x, t)] dt + g(t) dw_bar,   score = -eps_hat / sigma_t,

integrated from T down to eps; with ``denoise`` the last update from eps goes to the data
without noise as the Tweedie step x0_hat (the usual noise-free last step).

``euler_maruyama``: the Euler-Maruyama discretization of eq. 6 on the grid.

``pc``: predictor-corrector sampling (their Algorithms 2 and 3; 4 and 5 in the appendix).
At every level, ``n_corrector`` Langevin corrector steps (Algorithm 4/5)

    x <- x + e score + sqrt(2 e) z,   e = 2 r (snr ||z|| / ||score||)^2,

then a predictor step to the next level s < t. In terms of the SDE's Gaussian kernel
x_t = a_ts x_s + G_ts z, a_ts = alpha_t / alpha_s, G_ts^2 = sigma_t^2 - a_ts^2 sigma_s^2
(Ho's beta on VP, sigma_t^2 - sigma_s^2 on VE), the ``predictor`` is

  "ancestral" (default): x_s = (x_t + G_ts^2 score) / a_ts + sqrt(G_ts^2 sigma_s^2 / sigma_t^2) z,
      the step of DDPM's Algorithm 2 (Ho et al. 2020 eq. 11; score_sde's ancestral-sampling
      predictor, with the posterior variance beta_tilde of ``ancestral``). For Gaussian data
      and the exact score its mean is the exact E[x_s | x_t] for any step size.
  "reverse_diffusion": x_s = x_t - f_ts(x_t) + G_ts^2 score + G_ts z with f_ts(x) = (a_ts - 1) x,
      their eq. 47 (the reverse of the forward discretization, eq. 46). Its (2 - a_ts) x is
      the first-order expansion of x / a_ts: right to O(h^2) per step for the ~1000 steps it
      was written for, but at 10-50 steps 2 - a_ts falls well short of 1 / a_ts on the
      first, large steps, it undershoots the growth of the signal and the samples degrade.

The corrector's signal ratio r is the per-step alpha_i = 1 - beta_i of the reference code for
VP and 1 for VE; generically r = (alpha(t) / alpha(t - T/N))^2, the squared signal decay
over one of the SDE's N discrete steps.

``corrector_norm`` says which norms set the step size e. "expected" (default): the
expectations of the two squared norms, E||z||^2 = d and E||score||^2 = d / sigma_t^2 (the
conditional score -z / sigma_t of the forward kernel, whose squared norm the trained
network's target has on average), so that e = 2 r snr^2 sigma_t^2: the same for every sample
and state. Image k then depends on its own generator only, and the Langevin step is the
unadjusted Langevin algorithm with a step fixed per level, whose stationary variance on
Gaussian data of marginal variance v is v / (1 - e / (2 v)) in every dimension.
"sample": each sample's own ||z|| and ||score||, as Algorithms 4-5 are written; the ratio
||z||^2 / ||score||^2 is heavy-tailed in low dimension and correlated with the state (a
sample near the mode has a small score and takes a long step), so on 2-D Gaussian data with
the exact score the samples come out several times too wide; in image dimensions the norms
concentrate and it behaves. "batch": the norms averaged over the batch, as in the reference
code (score_sde's ``LangevinCorrector``), which ties each image to its batch mates.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from sde.samplers.ancestral import ancestral_step
from sde.samplers.common import Callback, Denoiser, NoiseGrid, NoiseSource, report
from sde.samplers.spec import Option, SamplerSpec, register, always, first_order_nfe

Tensor = torch.Tensor


CORRECTOR_NORMS = ("expected", "sample", "batch")
PREDICTORS = ("ancestral", "reverse_diffusion")


def euler_maruyama(model: Denoiser, x: Tensor, grid: NoiseGrid, *, sde, noise: NoiseSource,
                   callback: Callback | None = None, disable: bool = False) -> Tensor:
    """Euler-Maruyama on the reverse-time SDE, Song et al. 2021 eq. 6."""
    for i in tqdm(range(len(grid) - 1), disable=disable, desc="euler_maruyama"):
        t, alpha_t, sigma_t = grid.level(i)
        s, _, sigma_s = grid.level(i + 1)
        x0, eps = model(x, t, alpha_t, sigma_t)
        if sigma_s == 0:
            x = x0
        else:
            t_tensor = torch.tensor(t, dtype=torch.float64)
            drift_coef = float(sde.drift_coef(t_tensor))
            diffusion_sq = float(sde.diffusion_sq(t_tensor))
            dt = t - s
            x = x - (drift_coef * x + diffusion_sq * eps / sigma_t) * dt
            x = x + (diffusion_sq * dt) ** 0.5 * noise.randn(x.shape)
        report(callback, i, s, x, x0)
    return x


def langevin_signal_ratio(sde, t: float) -> float:
    """(alpha(t) / alpha(t - T/N))^2: alpha_i = 1 - beta_i on VP, 1 on VE (Algorithms 4-5)."""
    times = torch.tensor([t, max(t - sde.T / sde.N, 0.0)], dtype=torch.float64)
    alpha_now, alpha_before = sde.alpha(times).tolist()
    return (alpha_now / alpha_before) ** 2


def norms(v: Tensor, corrector_norm: str) -> Tensor:
    """||v_k|| per sample, or their batch mean (``corrector_norm="batch"``), broadcastable to v."""
    norm = v.flatten(1).norm(dim=1)
    if corrector_norm == "batch":
        norm = norm.mean().expand_as(norm)
    return norm.reshape((-1,) + (1,) * (v.ndim - 1))


def langevin_step(x: Tensor, score: Tensor, z: Tensor, snr: float, signal_ratio: float,
                  sigma: float, corrector_norm: str = "expected") -> Tensor:
    """One Langevin corrector step of Song et al. 2021 Algorithms 4-5 (z ~ N(0, I) given) at
    the level of noise std ``sigma``; the norms of the step size e as ``corrector_norm`` says."""
    if corrector_norm == "expected":  # E||z||^2 / E||score||^2 = d / (d / sigma^2)
        step_size = 2.0 * signal_ratio * (snr * sigma) ** 2
    else:
        step_size = 2.0 * signal_ratio * (snr * norms(z, corrector_norm) / norms(score, corrector_norm)) ** 2
    return x + step_size * score + (2.0 * step_size) ** 0.5 * z


def pc(model: Denoiser, x: Tensor, grid: NoiseGrid, *, sde, noise: NoiseSource,
       callback: Callback | None = None, disable: bool = False, snr: float = 0.16,
       n_corrector: int = 1, corrector_norm: str = "expected",
       predictor: str = "ancestral") -> Tensor:
    """Predictor-corrector sampling, Song et al. 2021 Algorithms 2-3 (Langevin corrector)."""
    for i in tqdm(range(len(grid) - 1), disable=disable, desc="pc"):
        level_t, level_s = grid.level(i), grid.level(i + 1)
        t, alpha_t, sigma_t = level_t
        s, alpha_s, sigma_s = level_s
        signal_ratio = langevin_signal_ratio(sde, t)
        for _ in range(n_corrector):
            _, eps = model(x, *level_t)
            x = langevin_step(x, -eps / sigma_t, noise.randn(x.shape), snr, signal_ratio, sigma_t,
                              corrector_norm)
        x0, eps = model(x, *level_t)
        if sigma_s == 0:
            x = x0
        elif predictor == "ancestral":
            x = ancestral_step(x, eps, level_t, level_s, noise)
        else:  # eq. 47: x - f_ts(x) + G^2 score + G z, with f_ts(x) = (a_ts - 1) x
            a_ts = alpha_t / alpha_s
            g_sq = sigma_t ** 2 - a_ts ** 2 * sigma_s ** 2
            x = (2.0 - a_ts) * x - g_sq * eps / sigma_t + g_sq ** 0.5 * noise.randn(x.shape)
        report(callback, i, s, x, x0)
    return x


def pc_nfe(steps: int, options: dict) -> int:
    """Each predictor step is followed by ``n_corrector`` corrector steps, one evaluation each."""
    return (steps - 1 + int(options["denoise"])) * (1 + options["n_corrector"])


SAMPLERS = register(
    SamplerSpec(name="euler_maruyama", fn=euler_maruyama, options={}, nfe=first_order_nfe,
                schedule="log_snr", stochastic=always, reference="Song et al. 2021, eq. 6"),
    SamplerSpec(
        name="pc", fn=pc,
        options={"snr": Option(0.16, float, "signal-to-noise ratio of the Langevin corrector step",
                               valid=lambda snr: snr > 0, accepted="be positive"),
                 "n_corrector": Option(1, int, "corrector steps per predictor step",
                                       valid=lambda n: n >= 0, accepted="be a non-negative integer"),
                 "corrector_norm": Option("expected", str, "norms in the corrector's step size: their "
                                                           "expectations, each sample's own, or the "
                                                           "batch's mean",
                                          choices=CORRECTOR_NORMS),
                 "predictor": Option("ancestral", str, "the predictor step", choices=PREDICTORS)},
        nfe=pc_nfe, schedule="log_snr", stochastic=always, reference="Song et al. 2021, Alg. 2-3"),
)
