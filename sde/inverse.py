"""Linear inverse problems with an unconditional network: inpainting, colorization, block
super-resolution, through one interface.

An observation is y = A x with A's rows orthonormal (A A^T = I), so all the methods need is
the orthogonal projector P = A^T A onto the observed subspace, applied in x's own space:
``Projector.project(x)``. The observation is handed over as P x (x-shaped; what is not
observed is ignored). A mask (inpainting) keeps pixels; ``ChannelMean`` (colorization) keeps
the per-pixel mean of the colour channels (the grey image, up to a constant); ``BlockMean``
(super-resolution) keeps the means of k x k blocks. A new linear task is a new projector.

Methods, both on the ancestral chain of a grid t_0 = T > ... > t_{N-1} = eps > 0, with the
reverse step x_s ~ N(mu(x_t), v_ts I) of Ho et al. 2020 (eq. 7, the posterior variance):

* ``replacement`` (Song et al. 2021, Appendix I.2, "imputation"): after every reverse step the
  observed part is replaced by the observation noised to the step's level,
  x_s <- (I - P) x_s + P (alpha_s y + sigma_s z). Cheap (one evaluation per step) but not
  exact: the unobserved part never learns how the observed part got there, and the samples
  are biased even with the exact score (tests measure it).
* ``smc`` (SMCDiff, Trippe et al. 2022, Algorithm 1): the observation is noised along the
  forward chain, y_{t_0}, ..., y_{t_{N-1}}; K particles carry the unobserved part, each step
  weighted by the reverse kernel's density of the next observed state,
  w = N(P y_s; P mu(x_t), v_ts P), resampled when the effective sample size falls below
  K / 2 (systematic resampling), then moved by the reverse kernel with the observed part set
  to y_s. Its samples approach the exact posterior as K and the steps grow; one particle per
  observation is returned, drawn by the final weights. NFE per sample: K per step.

Observed values are exact in the output: the last step sets P x = P y.

Noisy observations, y = A x + noise * n with n ~ N(0, I) (``noise`` > 0): the likelihood of x
is that of an exact observation of the diffused state x_t* at the level where
sigma_t* / alpha_t* = noise, with the value alpha_t* y, since
N(alpha_t* y; alpha_t* A x, sigma_t*^2) is proportional to N(y; A x, noise^2) as a function
of x. So both methods solve the exact problem down to t* with the observation alpha_t* y, and
from t* to the data the unobserved *and* observed parts follow the unconditional reverse
chain, which denoises the observed part: p(x | y) = integral of p(x | x_t*) p(x_t* | y). The
observed part of the output then matches y to the noise level, not exactly. t* is inserted
into the grid, so every grid level above it is conditioned and every level below is not; a t*
below the grid's end eps (noise under sigma_eps / alpha_eps) counts as exact. ``noise`` is in
A's orthonormal coordinates: per pixel for a mask, noise / sqrt(C) per grey value for
``ChannelMean``, noise / factor per block mean for ``BlockMean``. Denoising (P = I) needs no
conditioning at all: x_t* = alpha* y, then ``steps`` unconditional steps from t* to eps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from sde import randomness
from sde.network import CountedModel
from sde.samplers.common import NoiseGrid
from sde.samplers.schedules import build_grid

Tensor = torch.Tensor

METHODS = ("replacement", "smc")
#: Resample when the effective sample size falls below this fraction of the particles.
RESAMPLE_FRACTION = 0.5


class Projector:
    """An orthogonal projector P onto the observed subspace, applied to x-shaped tensors."""

    #: P = I: every value is observed (denoising); nothing is left for a method to infer.
    observes_everything = False

    def project(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def observe(self, x: Tensor) -> Tensor:
        """The observation of x, as this module takes it: P x."""
        return self.project(x)


@dataclass
class Mask(Projector):
    """Inpainting: ``mask`` (bool or 0/1, broadcastable to one example, e.g. [1, H, W] or
    [D]) marks the observed values; P x = mask * x."""

    mask: Tensor

    def __post_init__(self):
        self.observes_everything = bool(torch.as_tensor(self.mask).bool().all())

    def project(self, x: Tensor) -> Tensor:
        return x * self.mask.to(device=x.device, dtype=x.dtype)


class ChannelMean(Projector):
    """Colorization: the observed part of an image [B, C, H, W] is its per-pixel channel mean,
    the grey image (A's row per pixel: (1, ..., 1) / sqrt(C)); P x = mean over C, repeated."""

    def project(self, x: Tensor) -> Tensor:
        return x.mean(dim=1, keepdim=True).expand_as(x)


@dataclass
class BlockMean(Projector):
    """Super-resolution: the observed part is the mean of each ``factor`` x ``factor`` block
    (A's rows: the blocks' indicators / factor); P x = those means, repeated over the block."""

    factor: int

    def project(self, x: Tensor) -> Tensor:
        pooled = torch.nn.functional.avg_pool2d(x, self.factor)
        return torch.nn.functional.interpolate(pooled, scale_factor=self.factor, mode="nearest")


def box_mask(shape: tuple[int, ...], top: int, left: int, height: int, width: int) -> Tensor:
    """An image mask [C, H, W] observing everything but the box (the box is to be filled in)."""
    mask = torch.ones(shape, dtype=torch.bool)
    mask[:, top:top + height, left:left + width] = False
    return mask


def half_mask(shape: tuple[int, ...], side: str = "right") -> Tensor:
    """Observe one half of an image [C, H, W]: the half opposite ``side`` is kept."""
    mask = torch.ones(shape, dtype=torch.bool)
    width = shape[-1]
    if side == "right":
        mask[..., width // 2:] = False
    elif side == "bottom":
        mask[..., shape[-2] // 2:, :] = False
    else:
        raise ValueError(f"side must be 'right' or 'bottom', got {side!r}")
    return mask


def random_mask(shape: tuple[int, ...], keep: float, generator: torch.Generator) -> Tensor:
    """Observe each value with probability ``keep`` (the same pixels in every channel)."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must lie in [0, 1], got {keep}")
    pixels = randomness.rand((1, *shape[1:]), generator=generator, dtype=torch.float64) < keep
    return pixels.expand(shape).clone()


def _grid(sde, steps: int, eps: float):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2, got {steps!r}")
    if not 0.0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, T={sde.T:g}), got {eps}")
    return build_grid(sde, steps, "uniform", eps, discrete=False, to_data=True)


def _reverse_moments(network: CountedModel, x: Tensor, level_t, level_s) -> tuple[Tensor, float]:
    """Mean and variance of the reverse step t -> s (Ho et al. eq. 7 with x0 from eps_hat)."""
    t, alpha_t, sigma_t = level_t
    _, alpha_s, sigma_s = level_s
    eps_hat = network(x, t)
    a_ts = alpha_t / alpha_s
    beta_ts = sigma_t ** 2 - a_ts ** 2 * sigma_s ** 2
    mean = (x - beta_ts / sigma_t * eps_hat) / a_ts
    return mean, beta_ts * sigma_s ** 2 / sigma_t ** 2


def _levels(grid) -> list[tuple[float, float, float]]:
    return [(float(t), float(a), float(s)) for t, a, s in zip(grid.t, grid.alpha, grid.sigma)]


def observation_level(sde, noise: float) -> tuple[float, float, float]:
    """(t*, alpha_t*, sigma_t*) with sigma_t* / alpha_t* = noise: the diffusion level at which an
    exact observation has the likelihood of y = A x + noise * n (module docstring). noise = 0
    gives the data level (0, 1, 0)."""
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0 (the observation's standard deviation), got {noise!r}")
    if noise == 0:
        return 0.0, 1.0, 0.0
    top = torch.tensor(sde.T, dtype=torch.float64)
    ceiling = float(sde.sigma(top) / sde.alpha(top))
    if noise >= ceiling:
        raise ValueError(f"noise={noise:g} is at or above the prior's level sigma_T / alpha_T = {ceiling:.4g}: the "
                         f"observation carries no information the prior does not; accepted: 0 <= noise < {ceiling:.4g}")
    bottom = torch.tensor(0.0, dtype=torch.float64)
    floor = float(sde.sigma(bottom) / sde.alpha(bottom))  # VE: sigma_min; VP and sub-VP: 0
    if noise <= floor:
        raise ValueError(f"noise={noise:g} is at or below this SDE's level at t = 0 (sigma_0 / alpha_0 = {floor:.4g}); "
                         f"accepted: noise = 0 (exact observations) or {floor:.4g} < noise < {ceiling:.4g}")
    t = sde.t_from_log_snr(torch.tensor(-math.log(noise), dtype=torch.float64)).to(torch.float64)  # log(alpha/sigma)
    return float(t), float(sde.alpha(t)), float(sde.sigma(t))


def _star(sde, noise: float, eps: float) -> tuple[float, float, float]:
    """The observation's level on a grid that ends at eps: below eps (noise under
    sigma_eps / alpha_eps) the network is not evaluated, and the observation counts as exact."""
    star = observation_level(sde, noise)
    return star if star[0] >= eps else (0.0, 1.0, 0.0)


def _split_levels(levels, star):
    """The grid's levels split at t*: (T, ..., t*) conditioned and (t*, ..., data) not."""
    above = [level for level in levels if level[0] > star[0]] + [star]
    below = [star] + [level for level in levels if level[0] < star[0]]
    return above, below


def _unconditional_tail(network: CountedModel, x: Tensor, below, generator) -> Tensor:
    """The ancestral chain over ``below`` (from t* to the data) with no observation."""
    for level_t, level_s in zip(below[:-1], below[1:]):
        mean, variance = _reverse_moments(network, x, level_t, level_s)
        x = mean + (math.sqrt(variance) * randomness.randn(x.shape, generator=generator, device=x.device,
                                                           dtype=x.dtype) if variance > 0 else 0.0)
    return x


def noised_observations(y: Tensor, projector: Projector, levels, generator) -> list[Tensor]:
    """P y carried up the forward chain: one draw of (P y_{t_k})_k with the forward process's
    joint law, y at the data end and each level from the one below it,
    y_t = (alpha_t / alpha_s) y_s + sqrt(sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2) P z."""
    observed = [projector.project(y)]
    for (_, alpha_t, sigma_t), (_, alpha_s, sigma_s) in zip(levels[-2::-1], levels[:0:-1]):
        a_ts = alpha_t / alpha_s
        z = randomness.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        observed.append(a_ts * observed[-1] + math.sqrt(max(sigma_t ** 2 - a_ts ** 2 * sigma_s ** 2, 0.0))
                        * projector.project(z))
    return observed[::-1]  # level order: T first, the data last


def _denoise(model, sde, y: Tensor, star, steps: int, eps: float, generator) -> tuple[Tensor, int]:
    """P = I: x_t* = alpha* y is an exact draw of x_t* given y (module docstring), so the
    ancestral chain runs from there, on its own grid of ``steps`` levels from t* to eps."""
    network = CountedModel(model)
    t_star, alpha_star, sigma_star = star
    if t_star == 0.0:  # an exact observation of everything
        return y.clone(), 0
    t = torch.linspace(t_star, eps, steps, dtype=torch.float64)
    grid = NoiseGrid(t, sde.alpha(t).to(torch.float64), sde.sigma(t).to(torch.float64)).with_data()
    with torch.no_grad():
        x = _unconditional_tail(network, alpha_star * y, _levels(grid), generator)
    return x, network.nfe


def replacement(model, sde, y: Tensor, projector: Projector, *, steps: int = 100, eps: float = 1e-3,
                noise: float = 0.0, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Any]]:
    """Song et al. 2021's imputation by replacement (module docstring); y: [B, ...] (P y is used),
    observed with standard deviation ``noise`` (0: exactly)."""
    grid, star = _grid(sde, steps, eps), _star(sde, noise, eps)
    info = {"method": "replacement", "steps": steps, "noise": noise, "observation_t": star[0]}
    if projector.observes_everything:
        x, nfe = _denoise(model, sde, y.to(torch.float64), star, steps, eps, generator)
        return x, {"nfe": nfe, **info}
    above, below = _split_levels(_levels(grid), star)
    _, alpha_star, sigma_star = star
    network = CountedModel(model)
    y = y.to(torch.float64)
    free = lambda v: v - projector.project(v)  # noqa: E731 -- (I - P) v

    def observed_at(level) -> Tensor:  # P y_s: alpha_s y plus the noise the observation lacks at s
        _, alpha_s, sigma_s = level
        spread = math.sqrt(max(sigma_s ** 2 - (alpha_s / alpha_star) ** 2 * sigma_star ** 2, 0.0))
        noise_s = randomness.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        return projector.project(alpha_s * y + spread * noise_s)

    with torch.no_grad():
        x = sde.prior_sampling(y.shape, generator=generator, device=y.device, dtype=torch.float64)
        x = free(x) + observed_at(above[0])
        for level_t, level_s in zip(above[:-1], above[1:]):
            mean, variance = _reverse_moments(network, x, level_t, level_s)
            x = mean + math.sqrt(variance) * randomness.randn(x.shape, generator=generator, device=x.device,
                                                              dtype=x.dtype)
            x = free(x) + observed_at(level_s)
        x = _unconditional_tail(network, x, below, generator)
    return x, {"nfe": network.nfe, **info}


def _systematic_resample(log_weights: Tensor, generator) -> Tensor:
    """Indices [B, K] drawn by systematic resampling from each row's normalised weights."""
    batch, particles = log_weights.shape
    weights = torch.softmax(log_weights, dim=1)
    cumulative = torch.cumsum(weights, dim=1)
    cumulative[:, -1] = 1.0
    offset = randomness.rand((batch, 1), generator=generator, device=log_weights.device, dtype=weights.dtype)
    points = (offset + torch.arange(particles, device=log_weights.device, dtype=weights.dtype)) / particles
    return torch.searchsorted(cumulative, points).clamp_max(particles - 1)


def smc(model, sde, y: Tensor, projector: Projector, *, steps: int = 100, particles: int = 16,
        eps: float = 1e-3, noise: float = 0.0,
        generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Any]]:
    """SMCDiff (module docstring) with ``particles`` particles per observation; y: [B, ...],
    observed with standard deviation ``noise`` (0: exactly).

    Returns ([B, ...] one particle per observation drawn by the final weights, info with the
    NFE per sample (``particles`` per conditioned step, one per step below t*), the number of
    resampling events and the final effective sample sizes)."""
    if isinstance(particles, bool) or not isinstance(particles, int) or particles < 1:
        raise ValueError(f"particles must be a positive integer, got {particles!r}")
    grid, star = _grid(sde, steps, eps), _star(sde, noise, eps)
    if projector.observes_everything:  # nothing to infer: one exact chain, no particles
        x, nfe = _denoise(model, sde, y.to(torch.float64), star, steps, eps, generator)
        return x, {"nfe": nfe, "method": "smc", "steps": steps, "particles": particles, "noise": noise,
                   "observation_t": star[0], "resamplings": 0, "final_ess": [float(particles)] * len(y)}
    levels, below = _split_levels(_levels(grid), star)
    network = CountedModel(model)
    y = y.to(torch.float64)
    batch, shape = y.shape[0], tuple(y.shape[1:])
    flat = (batch * particles, *shape)
    with torch.no_grad():
        observed = [o.repeat_interleave(particles, dim=0)
                    for o in noised_observations(star[1] * y, projector, levels, generator)]
        x = sde.prior_sampling(flat, generator=generator, device=y.device, dtype=torch.float64)
        x = x - projector.project(x) + observed[0]
        log_weights = torch.zeros(batch, particles, dtype=torch.float64, device=y.device)
        resamplings = 0
        for k, (level_t, level_s) in enumerate(zip(levels[:-1], levels[1:])):
            mean, variance = _reverse_moments(network, x, level_t, level_s)
            if variance > 0:  # the last step, to the data, is deterministic and carries no weight
                residual = projector.project(observed[k + 1] - mean).flatten(1)
                log_weights = log_weights - (residual ** 2).sum(1).reshape(batch, particles) / (2 * variance)
                weights = torch.softmax(log_weights, dim=1)
                ess = 1.0 / (weights ** 2).sum(1)
                if bool((ess < RESAMPLE_FRACTION * particles).any()):
                    rows = ess < RESAMPLE_FRACTION * particles
                    index = torch.arange(particles, device=y.device).expand(batch, particles).clone()
                    index[rows] = _systematic_resample(log_weights[rows], generator)
                    chosen = (index + particles * torch.arange(batch, device=y.device)[:, None]).flatten()
                    mean = mean[chosen]
                    log_weights = torch.where(rows[:, None], torch.zeros_like(log_weights), log_weights)
                    resamplings += int(rows.sum())
            step = math.sqrt(variance) * randomness.randn(flat, generator=generator, device=y.device,
                                                          dtype=torch.float64) if variance > 0 else 0.0
            moved = mean + step
            x = moved - projector.project(moved) + observed[k + 1]
        weights = torch.softmax(log_weights, dim=1)
        pick = randomness.multinomial(weights, 1, generator=generator)[:, 0] if particles > 1 else \
            torch.zeros(batch, dtype=torch.long, device=y.device)
        out = x.reshape(batch, particles, *shape)[torch.arange(batch, device=y.device), pick]
        conditioned_calls = network.nfe
        out = _unconditional_tail(network, out, below, generator)
    # one observation costs its K particles' evaluations at every conditioned network call
    nfe = conditioned_calls * particles + network.nfe - conditioned_calls
    return out, {"nfe": nfe, "method": "smc", "steps": steps, "particles": particles, "noise": noise,
                 "observation_t": star[0], "resamplings": resamplings,
                 "final_ess": (1.0 / (weights ** 2).sum(1)).tolist()}


def solve(method: str, model, sde, y: Tensor, projector: Projector, **options) -> tuple[Tensor, dict[str, Any]]:
    """``replacement`` or ``smc`` by name."""
    if method not in METHODS:
        raise ValueError(f"unknown inverse-problem method {method!r}; accepted: {', '.join(METHODS)}")
    return (replacement if method == "replacement" else smc)(model, sde, y, projector, **options)
