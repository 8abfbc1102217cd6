"""Align Your Steps (Sabour, Fidler & Kreis 2024): a schedule fitted to a model and its data.

In the scaled variable y = x / alpha(t), with Karras et al.'s noise level
s = sigma / alpha = exp(-lambda), every SDE of ``sdes.py`` is the variance-exploding
process y_s = x0 + s z, whatever its alpha(t). Its reverse-time SDE, in the time s, with the
denoiser D(y, s) = E[x0 | y_s = y] = y - s eps_theta(alpha y, t(s)), is (Song et al. 2021
eq. 6 with g^2 = d(s^2)/ds = 2 s and score (D - y) / s^2; Karras et al. 2022 eq. 6 with
sigma(t) = t, the parametrisation AYS works in)

    dy = -2 (D(y, s) - y) / s ds + sqrt(2 s) dw_bar.

A first-order stochastic step from level s_i down to s_{i+1} freezes the denoiser at its
start, D(y_{s_i}, s_i). That linear SDE is solved exactly by the DDPM posterior step (the
``ancestral`` step; DDIM with eta = 1; first-order SDE-DPM-Solver++). By Girsanov's theorem
the KL divergence from the true reverse process to the process these steps sample is at
most the sum over the steps of (AYS's "KLUB"; KL = E int |drift difference|^2 / (2 g^2) for
two SDEs with one diffusion coefficient g)

    KLUB_i = E int_{s_{i+1}}^{s_i} |drift - frozen drift|^2 / (2 g^2) ds
           = int_{s_{i+1}}^{s_i} s^-3 E |D(y_s, s) - D(y_{s_i}, s_i)|^2 ds,

with (y_s, y_{s_i}) on one path of the forward process: y_s = x0 + s z, then
y_{s_i} = y_s + sqrt(s_i^2 - s^2) z', x0 from the data. ``klub`` estimates each term by
importance sampling s with density proportional to s^-3 on the interval (normaliser
Z_i = (s_{i+1}^-2 - s_i^-2) / 2, so KLUB_i = Z_i E_q |D(y_s) - D(y_{s_i})|^2).

``fit_schedule`` minimises the sum over the interior levels with the ends fixed: t = T, and
t = eps, whose step down to the data has an infinite bound (D(y_s, s) -> x0 as s -> 0 while
the frozen D does not), so eps remains a choice. AYS refines one level at a time; here all
levels move at once, by Adam on the estimated sum (fresh draws every iteration,
differentiated through the network), because one-at-a-time moves converge slowly along the
chain of levels. A test checks the fit against the closed-form optimum on Gaussian data.
The fitted schedule serves every stochastic sampler and, as AYS reports, transfers to
higher-order and ODE solvers.
"""
from __future__ import annotations

from typing import Callable

import torch

from sde import randomness
from sde.network import CountedModel
from sde.samplers.schedules import time_steps

Tensor = torch.Tensor
#: ``draw_data(count, generator) -> x0``: ``count`` data points in the model's space.
DataSource = Callable[[int, torch.Generator], Tensor]


def noise_levels(sde, times: Tensor) -> Tensor:
    """s(t) = sigma(t) / alpha(t) = exp(-lambda(t)) (float64)."""
    return torch.exp(-sde.log_snr(times.to(torch.float64)))


def times_of(sde, levels: Tensor) -> Tensor:
    """The times whose noise level s is ``levels`` (float64)."""
    return sde.t_from_log_snr(-torch.log(levels)).to(torch.float64)


def as_network(model) -> CountedModel:
    """``model`` counted, called in its parameters' dtype and device (float32 on the CPU for
    a plain callable) on the float64 CPU tensors of the fit."""
    if isinstance(model, CountedModel):
        return model
    return CountedModel(model, dtype=torch.float32, device="cpu")


def denoised(network: CountedModel, sde, y: Tensor, levels: Tensor) -> Tensor:
    """D(y, s) = y - s eps(alpha y, t(s)) per sample (float64)."""
    times = times_of(sde, levels)
    alpha = sde.alpha(times).to(torch.float64)
    shape = (-1,) + (1,) * (y.ndim - 1)
    return y - levels.reshape(shape) * network(alpha.reshape(shape) * y, times)


class IntervalDraws:
    """The random numbers of one KLUB estimate on one interval: x0, z, z' and the uniform v
    that places s, kept so that several schedules can be scored on the same draws."""

    def __init__(self, draw_data: DataSource, batch_size: int, generator: torch.Generator):
        self.x0 = draw_data(batch_size, generator).to(torch.float64)
        self.z = randomness.randn(self.x0.shape, generator=generator, dtype=torch.float64)
        self.z_start = randomness.randn(self.x0.shape, generator=generator, dtype=torch.float64)
        self.v = randomness.rand(batch_size, generator=generator, dtype=torch.float64)

    def pairs(self, start: Tensor, end: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(y_s, y_start, s, Z) on the interval from level ``start`` down to ``end`` (0-d
        tensors; differentiable in both)."""
        inverse_sq_end, inverse_sq_start = end ** -2, start ** -2
        levels = (inverse_sq_end - self.v * (inverse_sq_end - inverse_sq_start)) ** -0.5
        shape = (-1,) + (1,) * (self.x0.ndim - 1)
        y = self.x0 + levels.reshape(shape) * self.z
        gap = (start ** 2 - levels ** 2).clamp_min(0.0).sqrt()
        y_start = y + gap.reshape(shape) * self.z_start
        return y, y_start, levels, (inverse_sq_end - inverse_sq_start) / 2.0


def interval_klubs(network: CountedModel, sde, levels: Tensor, draws: list[IntervalDraws]) -> Tensor:
    """KLUB_i of each step levels[i] -> levels[i + 1], estimated on draws[i], with the
    network evaluated once on all of them together (differentiable in ``levels``)."""
    ys, evaluated_levels, normalisers, sizes = [], [], [], []
    for start, end, draw in zip(levels[:-1], levels[1:], draws):
        y, y_start, s, normaliser = draw.pairs(start, end)
        ys += [y, y_start]
        evaluated_levels += [s, start.expand_as(s)]
        normalisers.append(normaliser)
        sizes.append(len(s))
    x0 = denoised(network, sde, torch.cat(ys), torch.cat(evaluated_levels))
    klubs, first = [], 0
    for normaliser, size in zip(normalisers, sizes):
        at_s, at_start = x0[first:first + size], x0[first + size:first + 2 * size]
        klubs.append(normaliser * (at_s - at_start).flatten(1).pow(2).sum(1).mean())
        first += 2 * size
    return torch.stack(klubs)


def klub(model, sde, times: Tensor, draw_data: DataSource, *, batch_size: int,
         generator: torch.Generator) -> Tensor:
    """KLUB_i of every step of the schedule ``times`` (decreasing), each on ``batch_size``
    draws of its own; their sum bounds the KL divergence of the first-order stochastic
    sampler on that grid (module docstring)."""
    network = as_network(model)
    draws = [IntervalDraws(draw_data, batch_size, generator) for _ in range(len(times) - 1)]
    with torch.no_grad():
        return interval_klubs(network, sde, noise_levels(sde, times), draws)


def _log_levels(gap_logits: Tensor, top: Tensor, bottom: Tensor) -> Tensor:
    """log s of a schedule from log s(T) = ``top`` down to ``bottom``, its steps' widths in
    log s the softmax of ``gap_logits`` times the whole width: ordered for any logits."""
    widths = torch.softmax(gap_logits, 0) * (top - bottom)
    inner = top - torch.cumsum(widths, 0)[:-1]
    return torch.cat([top.reshape(1), inner, bottom.reshape(1)])


def fit_schedule(model, sde, draw_data: DataSource, steps: int, *, eps: float,
                 initial: str = "log_snr", iterations: int = 300, batch_size: int = 16,
                 learning_rate: float = 0.1, generator: torch.Generator | None = None,
                 progress: Callable[[int, Tensor, float], None] | None = None) -> tuple[Tensor, dict]:
    """The ``steps`` times from T down to ``eps`` that minimise the summed KLUB (AYS).

    The interior levels are parametrised by the widths of the steps in log s, a softmax of
    free logits (so the levels stay ordered between the fixed ends), and the logits follow
    Adam on the summed KLUB, estimated on fresh draws at every iteration and differentiated
    through the network. The result is the average of the logits over the second half of
    the iterations (Polyak averaging, which removes most of the noise of the last steps).

    Args:
      model: ``model(x, t) -> eps``, t of shape [B]; differentiable in x and t.
      sde: the SDE the model was trained for.
      draw_data: ``draw_data(count, generator)``: data points (the model's training data).
      steps: levels of the schedule, both ends included (as ``samplers.sample``'s ``steps``).
      eps: the last level's time.
      initial: the named schedule the search starts from.
      iterations, batch_size, learning_rate: of Adam; ``batch_size`` draws per step per
        iteration.
      generator: the random stream (default: seeded with 0).
      progress: called after every iteration with (iteration, times, summed KLUB estimate).

    Returns:
      (times, info): float64 times with times[0] = T, times[-1] = eps; info holds
      ``klub_initial`` and ``klub_fitted`` (per step, on the same fresh draws, 4 x
      ``batch_size`` per step) and ``network_evaluations`` (samples through the network).
    """
    if steps < 3:
        raise ValueError(f"a fitted schedule needs steps >= 3 (the ends are fixed), got {steps}")
    if iterations < 1 or batch_size < 1 or not learning_rate > 0:
        raise ValueError(f"need iterations >= 1, batch_size >= 1 and learning_rate > 0, got "
                         f"{iterations}, {batch_size} and {learning_rate}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    network = as_network(model)
    initial_times = time_steps(sde, steps, initial, eps)
    initial_log_levels = torch.log(noise_levels(sde, initial_times))
    top, bottom = initial_log_levels[0], initial_log_levels[-1]
    gap_logits = torch.log(-torch.diff(initial_log_levels)).requires_grad_(True)
    optimizer = torch.optim.Adam([gap_logits], lr=learning_rate)
    averaged, averaged_count = torch.zeros_like(gap_logits), 0
    for iteration in range(iterations):
        levels = torch.exp(_log_levels(gap_logits, top, bottom))
        draws = [IntervalDraws(draw_data, batch_size, generator) for _ in range(steps - 1)]
        loss = interval_klubs(network, sde, levels, draws).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if 2 * (iteration + 1) > iterations:  # the second half (the last iteration at least)
            averaged += gap_logits.detach()
            averaged_count += 1
        if progress is not None:
            progress(iteration, times_of(sde, levels.detach()), float(loss.detach()))
    log_levels = _log_levels(averaged / averaged_count, top, bottom)
    times = times_of(sde, torch.exp(log_levels))
    times[0], times[-1] = initial_times[0], initial_times[-1]
    # Both schedules scored on one fresh set of draws, so that their difference is not noise.
    state = generator.get_state()
    klub_initial = klub(network, sde, initial_times, draw_data, batch_size=4 * batch_size,
                        generator=generator)
    generator.set_state(state)
    klub_fitted = klub(network, sde, times, draw_data, batch_size=4 * batch_size, generator=generator)
    return times, {"klub_initial": klub_initial.tolist(), "klub_fitted": klub_fitted.tolist(),
                   "network_evaluations": network.rows}

