"""Time-step schedules: the ``steps`` noise levels a fixed-step sampler evaluates the network at.

Every schedule gives ``steps`` decreasing times t_0 = T > t_1 > ... > t_{steps-1} = eps
(both ends included exactly). With ``denoise`` the sampler's last update then goes from eps
to the data. In terms of the log-SNR lambda(t) = log(alpha / sigma) and Karras et al.'s
noise level sigma_K = sigma / alpha = exp(-lambda), with u = k / (steps - 1):

  uniform    t_k = T + u (eps - T)                                   uniform in t
  quadratic  t_k = eps + (T - eps) (1 - u)^2                         DDIM's "quadratic" spacing
                                                                     (Song, Meng, Ermon 2021, App. D.2)
  log_snr    lambda_k = lambda(T) + u (lambda(eps) - lambda(T))      DPM-Solver's "logSNR" steps
                                                                     (Lu et al. 2022, sec. 3.3)
  karras     sigma_K,k = (sigma_K,max^(1/rho) + u (sigma_K,min^(1/rho) - sigma_K,max^(1/rho)))^rho,
             rho = 7                                                 Karras et al. 2022, eq. 5

and a time is recovered from a log-SNR with ``sde.t_from_log_snr``, so the same schedule
works for VP, sub-VP and VE.

Discrete grids (the DDPM chain of ``ancestral``, and ``discrete=True`` elsewhere) round
these times to the SDE's discrete steps t_i = T i / N, keeping ``steps`` distinct steps
with the first at i = N and the last at the step nearest eps (at least i = 1): for
``steps == N`` this is the whole chain, for fewer steps the respaced sub-chain of Nichol &
Dhariwal 2021, sec. 4.

Each sampler names its default schedule in its ``SamplerSpec`` (``spec.py``): the one
that ``bench/sampler_schedules.py`` found best for it on mixtures of narrow Gaussians with
their exact noise predictors, at about 10 and 20 NFE, on VP, sub-VP and VE (BENCHMARKS.md,
"Default schedules"). Uniform-in-t spends most steps at high noise; Karras' rho = 7, tuned
for images, puts many of few levels near eps. On VE, uniform in t is uniform in log-SNR
(lambda is linear in t there). ``ode`` with its default adaptive ``dopri5`` only reports at
the grid's levels.

Explicit schedules. Instead of a name, ``schedule`` may be the times themselves: a sequence
(or 1-d tensor) t_0 = T > t_1 > ... > t_{steps-1} > 0, or the path of a ``.json`` file
holding them under ``"t"`` (as ``--mode align_steps`` writes them: a schedule fitted to a
model and its data, ``align_steps.py``). Its last time is the grid's eps, and it fits
exactly one ``steps``.
"""
from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Sequence, Union

import torch

from sde.samplers.common import NoiseGrid

Tensor = torch.Tensor

SCHEDULES = ("uniform", "quadratic", "log_snr", "karras")

#: Karras et al. 2022, eq. 5: rho = 7 balances the truncation error across noise levels.
KARRAS_RHO = 7.0


def _interpolation(steps: int) -> Tensor:
    """u_k = k / (steps - 1) for k = 0..steps-1 (float64); [0] for a single step."""
    if steps == 1:
        return torch.zeros(1, dtype=torch.float64)
    return torch.linspace(0.0, 1.0, steps, dtype=torch.float64)


#: A schedule: one of ``SCHEDULES``, a ``.json`` schedule file, or the times themselves.
Schedule = Union[str, Sequence[float]]
#: Suffix of a schedule file (a JSON object whose ``"t"`` holds the times).
SCHEDULE_FILE_SUFFIX = ".json"
#: How far an explicit schedule's first time may lie from T (rounding of a stored float).
T_TOLERANCE = 1e-9


def is_explicit(schedule: Schedule) -> bool:
    """Whether ``schedule`` lists its times rather than naming a rule."""
    return not isinstance(schedule, str)


def check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; accepted: {', '.join(SCHEDULES)}, "
                         f"a sequence of times, or a {SCHEDULE_FILE_SUFFIX} schedule file")


def read_schedule_file(path: str | Path) -> list[float]:
    """The times stored under ``"t"`` in a schedule file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"schedule file {path} does not exist")
    try:
        times = json.loads(path.read_text())["t"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"schedule file {path} is not a JSON object with a list of times "
                         f"under 't' ({type(error).__name__}: {error})") from None
    return times


def resolve_schedule(sde, schedule: Schedule) -> Schedule:
    """A schedule name, checked; or explicit times (given, or read from a file), checked
    against the SDE and returned as a tuple of floats starting exactly at T."""
    if isinstance(schedule, str) and not schedule.endswith(SCHEDULE_FILE_SUFFIX):
        check_schedule(schedule)
        return schedule
    times = read_schedule_file(schedule) if isinstance(schedule, str) else schedule
    if isinstance(times, torch.Tensor) and times.ndim == 1:
        times = times.tolist()  # e.g. the times fit_schedule or time_steps return
    if (isinstance(times, (str, bytes)) or not isinstance(times, Sequence) or not times
            or not all(isinstance(t, numbers.Real) and not isinstance(t, bool) for t in times)):
        raise ValueError(f"an explicit schedule must be a non-empty sequence of times, got {times!r}")
    times = [float(t) for t in times]
    if not all(math.isfinite(t) for t in times):  # NaN would pass the order checks below
        raise ValueError(f"an explicit schedule's times must be finite numbers, got {times}")
    T = float(sde.T)
    if abs(times[0] - T) > T_TOLERANCE:
        raise ValueError(f"an explicit schedule must start at T={T:g}, got {times[0]!r}")
    times[0] = T
    if any(later >= earlier for earlier, later in zip(times, times[1:])) or times[-1] <= 0:
        raise ValueError(f"an explicit schedule must decrease strictly from T to a time > 0, got {times}")
    return tuple(times)


def check_steps(schedule: Schedule, steps: int) -> None:
    """An explicit schedule fits exactly ``len(schedule)`` steps."""
    if is_explicit(schedule) and len(schedule) != steps:
        raise ValueError(f"the explicit schedule has {len(schedule)} times, so it needs "
                         f"steps={len(schedule)}, got steps={steps}")


def time_steps(sde, steps: int, schedule: Schedule, eps: float) -> Tensor:
    """The ``steps`` times from ``sde.T`` down to ``eps`` of ``schedule`` (float64); an explicit
    schedule's own times (its last is eps)."""
    T = float(sde.T)
    if is_explicit(schedule):
        times = resolve_schedule(sde, schedule)
        check_steps(times, steps)
        if times[-1] != eps:
            raise ValueError(f"the explicit schedule ends at {times[-1]}, not at eps={eps}")
        return torch.tensor(times, dtype=torch.float64)
    check_schedule(schedule)
    if not 0.0 < eps < T:
        raise ValueError(f"eps must lie in (0, T={T:g}), got {eps}")
    u = _interpolation(steps)
    if schedule == "uniform":
        t = T + u * (eps - T)
    elif schedule == "quadratic":
        t = eps + (T - eps) * (1.0 - u) ** 2
    else:
        ends = torch.tensor([T, eps], dtype=torch.float64)
        log_snr_max_t, log_snr_eps = sde.log_snr(ends).tolist()
        if schedule == "log_snr":
            log_snr = log_snr_max_t + u * (log_snr_eps - log_snr_max_t)
        else:  # karras: interpolate sigma_K^(1/rho) with sigma_K = exp(-lambda)
            root_max = torch.exp(torch.tensor(-log_snr_max_t / KARRAS_RHO, dtype=torch.float64))
            root_min = torch.exp(torch.tensor(-log_snr_eps / KARRAS_RHO, dtype=torch.float64))
            log_snr = -KARRAS_RHO * torch.log(root_max + u * (root_min - root_max))
        t = sde.t_from_log_snr(log_snr).to(torch.float64)
    t[0] = T  # exact ends, free of the log-SNR round trip
    if steps > 1:
        t[-1] = eps
    return t


def discrete_steps(sde, times: Tensor) -> Tensor:
    """Indices i in 1..N of the discrete steps t_i = T i / N nearest ``times``, made distinct.

    The result starts at N and decreases strictly down to at least 1: indices that round
    onto their neighbour are pushed apart (first upwards from the last one, then downwards
    from N), so ``len(times)`` distinct steps always fit when there are at most N.
    """
    N, steps = sde.N, len(times)
    if steps > N:
        raise ValueError(f"a discrete grid has at most N={N} steps, got steps={steps}")
    index = torch.round(times / sde.T * N).long().clamp(1, N)
    for k in range(steps - 2, -1, -1):
        index[k] = max(int(index[k]), int(index[k + 1]) + 1)
    index[0] = N
    for k in range(1, steps):
        index[k] = min(int(index[k]), int(index[k - 1]) - 1)
    return index


def build_grid(sde, steps: int, schedule: Schedule, eps: float, *, discrete: bool,
               to_data: bool) -> NoiseGrid:
    """The noise levels of a fixed-step sampler: ``steps`` levels, then the data if ``to_data``.

    Continuous grids use ``sde.alpha(t)``, ``sde.sigma(t)`` at the schedule's times;
    discrete grids use the SDE's tables (``sde.discrete_alpha_sigma()``: Ho et al.'s
    alphas_cumprod on VP) at the rounded steps.
    """
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    t = time_steps(sde, steps, schedule, eps)
    if discrete:
        index = discrete_steps(sde, t)
        alpha_table, sigma_table = sde.discrete_alpha_sigma()
        grid = NoiseGrid(sde.discrete_times[index - 1], alpha_table[index - 1],
                         sigma_table[index - 1])
    else:
        grid = NoiseGrid(t, sde.alpha(t).to(torch.float64), sde.sigma(t).to(torch.float64))
    return grid.with_data() if to_data else grid

