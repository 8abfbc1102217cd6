"""Training objectives on the noise prediction eps_theta(x_t, t).

Continuous time (Song et al. 2021, eq. 7, in its eps form): with t ~ U(eps, T),
x_t = alpha(t) x_0 + sigma(t) z,

    L(theta) = E_t E_{x_0, z} [ w(t) * mean_d (eps_theta(x_t, t) - z)^2 ].

The plain loss takes w(t) = 1 (Ho et al.'s L_simple in continuous time). Likelihood
weighting (Song et al. 2021b, "Maximum Likelihood Training of Score-Based Diffusion
Models", Thm. 1) uses lambda(t) = g(t)^2 on the score, which in eps form is
w(t) = g(t)^2 / sigma(t)^2. For every SDE in sde/sdes.py this equals

    g^2 / sigma^2 = d log sigma^2/dt - 2 f = -2 d log_snr / dt,

so sampling t uniformly in log-SNR is exact importance sampling for that weight (the
weight cancels against the proposal density). We normalise the weight to mean 1 over
[eps, T] (divide by its mean, 2 (log_snr(eps) - log_snr(T)) / (T - eps)), so the weighted
loss has the scale of the plain one and the same learning rate serves both:

    uniform t:          w(t) / mean(w) * mse(t)
    importance-sampled: mse(t(lambda)),  lambda ~ U(log_snr(T), log_snr(eps)).

Perception-prioritized weighting (Choi et al. 2022, "Perception Prioritized Training of
Diffusion Models", eq. 8) rescales the plain loss by w(t) = (k + SNR(t))^-gamma, normalised
to mean 1 over t ~ U(eps, T) like the likelihood weight: it takes weight from the nearly clean
levels, where the network learns imperceptible detail, and gives it to the noisy levels where
the content of an image is decided (on VP with k = gamma = 1, w is sigma(t)^2 up to the
normalisation). ``p2_gamma = 0`` (the default) is the plain loss.

Discrete time (``training.continuous=False``): Ho et al. 2020 eq. 14, L_simple with the
integer step i ~ U{1..N}, the DDPM tables (alpha_i, sigma_i) and the network fed t_i = T i/N.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sde import randomness
from sde.sdes import SDE, broadcast_to

Tensor = torch.Tensor
Model = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class LossConfig:
    continuous: bool = True
    likelihood_weighting: bool = False
    importance_sampling: bool = True
    eps: float = 1e-5
    p2_gamma: float = 0.0
    p2_k: float = 1.0


#: Points of the trapezoidal rule that normalises the perception-prioritized weight.
P2_QUADRATURE_POINTS = 4097


def p2_weight(sde: SDE, t: Tensor, cfg: LossConfig) -> Tensor:
    """(k + SNR(t))^-gamma / its mean over t ~ U(eps, T) (Choi et al. 2022, eq. 8), with
    SNR = alpha^2 / sigma^2 = exp(2 lambda)."""
    def raw(times: Tensor) -> Tensor:
        return (cfg.p2_k + (2.0 * sde.log_snr(times)).exp()) ** -cfg.p2_gamma

    grid = torch.linspace(cfg.eps, sde.T, P2_QUADRATURE_POINTS, dtype=torch.float64, device=t.device)
    mean = torch.trapezoid(raw(grid), grid) / (sde.T - cfg.eps)
    return raw(t) / mean


def _randn_shard(x0: Tensor, generator: torch.Generator | None, shard: tuple[int, int]) -> Tensor:
    """Noise for this rank's slice of the global batch, drawn for the whole global batch.

    Every rank draws the same global tensor from an identically seeded generator and keeps
    its slice, so a run on ``world`` ranks sees the same noise as a single process.
    """
    rank, world = shard
    batch = x0.shape[0]
    full = randomness.randn((batch * world,) + x0.shape[1:], generator=generator, device=x0.device,
                            dtype=x0.dtype)
    return full[rank * batch:(rank + 1) * batch]


def _per_sample_mse(eps_pred: Tensor, noise: Tensor) -> Tensor:
    return (eps_pred.float() - noise.float()).pow(2).flatten(1).mean(1)


def sample_time(sde: SDE, batch: int, cfg: LossConfig, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu", shard: tuple[int, int] = (0, 1)
                ) -> tuple[Tensor, Tensor]:
    """Training times t [B] (float64) and the per-sample loss weights [B] of the objective."""
    rank, world = shard
    uniform = randomness.rand(batch * world, generator=generator, device=device,
                              dtype=torch.float64)[rank * batch:(rank + 1) * batch]
    t_min, t_max = cfg.eps, sde.T
    if not cfg.likelihood_weighting:
        t = t_min + (t_max - t_min) * uniform
        return t, (p2_weight(sde, t, cfg) if cfg.p2_gamma else torch.ones_like(uniform))
    end = torch.tensor([t_min, t_max], dtype=torch.float64, device=device)
    log_snr_max, log_snr_min = sde.log_snr(end)
    if cfg.importance_sampling:
        log_snr = log_snr_min + (log_snr_max - log_snr_min) * uniform
        return sde.t_from_log_snr(log_snr).clamp(t_min, t_max), torch.ones_like(uniform)
    t = t_min + (t_max - t_min) * uniform
    mean_weight = 2.0 * (log_snr_max - log_snr_min) / (t_max - t_min)
    weight = sde.diffusion_sq(t) / sde.sigma(t) ** 2 / mean_weight
    return t, weight


def continuous_loss(model: Model, sde: SDE, x0: Tensor, cfg: LossConfig,
                    generator: torch.Generator | None = None,
                    shard: tuple[int, int] = (0, 1)) -> Tensor:
    """Denoising score matching on eps with t ~ U(eps, T) (weights: module docstring).

    ``shard=(rank, world)``: x0 is this rank's slice of a global batch (see _randn_shard).
    """
    t, weight = sample_time(sde, x0.shape[0], cfg, generator, x0.device, shard)
    noise = _randn_shard(x0, generator, shard)
    x_t = broadcast_to(sde.alpha(t), x0) * x0 + broadcast_to(sde.sigma(t), x0) * noise
    eps_pred = model(x_t, t.to(x0.dtype))
    return (weight.float() * _per_sample_mse(eps_pred, noise)).mean()


def discrete_loss(model: Model, sde: SDE, x0: Tensor,
                  generator: torch.Generator | None = None,
                  shard: tuple[int, int] = (0, 1)) -> Tensor:
    """DDPM L_simple (Ho et al. 2020, eq. 14) over integer steps i ~ U{1..N}."""
    rank, world = shard
    batch = x0.shape[0]
    step = randomness.randint(0, sde.N, (batch * world,), generator=generator,
                              device=x0.device)[rank * batch:(rank + 1) * batch]
    alpha_i, sigma_i = (v.to(x0.device)[step] for v in sde.discrete_alpha_sigma())
    t = sde.discrete_times.to(x0.device)[step]
    noise = _randn_shard(x0, generator, shard)
    x_t = broadcast_to(alpha_i, x0) * x0 + broadcast_to(sigma_i, x0) * noise
    return _per_sample_mse(model(x_t, t.to(x0.dtype)), noise).mean()


def make_loss_fn(sde: SDE, cfg: LossConfig) -> Callable[..., Tensor]:
    """loss_fn(model, x0, generator=None, shard=(0, 1)) -> scalar loss, as configured."""
    if cfg.p2_gamma and (cfg.likelihood_weighting or not cfg.continuous):
        raise ValueError("p2_gamma reweights the plain continuous loss: it needs continuous=True and "
                         "likelihood_weighting=False")
    if cfg.continuous:
        return lambda model, x0, generator=None, shard=(0, 1): continuous_loss(
            model, sde, x0, cfg, generator, shard)
    if cfg.likelihood_weighting:
        raise ValueError("training.likelihood_weighting needs training.continuous=True "
                         "(the discrete objective is L_simple)")
    return lambda model, x0, generator=None, shard=(0, 1): discrete_loss(
        model, sde, x0, generator, shard)
