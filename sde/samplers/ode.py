"""The probability-flow ODE (Song et al. 2021, eq. 13) solved with torchdiffeq.

    dx/dt = f(t) x - g(t)^2 / 2 * score(x, t) = f(t) x + g(t)^2 / (2 sigma_t) * eps_hat(x, t)

integrated from T down to eps, in float64 (the network is called in its own dtype), then,
with ``denoise``, the Tweedie step x0_hat at eps.

``method="dopri5"``: adaptive Dormand-Prince 5(4) with ``rtol``/``atol`` (defaults 1e-5,
as in the reference code); the grid's levels are only the times at which the solution is
reported to the callback, and the NFE is whatever the step-size control needs (counted).
``method`` in ``euler``, ``midpoint``, ``rk4``: torchdiffeq's fixed-grid solvers stepping
exactly on the grid's levels, 1, 2 and 4 evaluations per step (rk4 is its 3/8-rule
variant).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from sde.samplers.common import Callback, Denoiser, NoiseGrid, NoiseSource, report
from sde.samplers.spec import Option, SamplerSpec, register

Tensor = torch.Tensor

#: network evaluations per step of each torchdiffeq method (None: adaptive).
METHOD_STAGES = {"dopri5": None, "euler": 1, "midpoint": 2, "rk4": 4}
#: tolerances of the adaptive solver (score_sde's ODE sampler defaults).
DEFAULT_TOLERANCE = 1e-5


def check_options(options: dict, sde, given: set) -> None:
    method = options["method"]
    if method != "dopri5" and given & {"rtol", "atol"}:
        raise ValueError(f"rtol/atol apply to the adaptive method='dopri5' only, not "
                         f"method={method!r}")


def ode(model: Denoiser, x: Tensor, grid: NoiseGrid, *, sde, noise: NoiseSource,
        callback: Callback | None = None, disable: bool = False, method: str = "dopri5",
        rtol: float = DEFAULT_TOLERANCE, atol: float = DEFAULT_TOLERANCE) -> Tensor:
    """Probability-flow ODE sampler, Song et al. 2021 eq. 13 (torchdiffeq ``odeint``)."""
    levels = len(grid) - 1 if grid.ends_at_data else len(grid)
    times = grid.t[:levels]
    stages = METHOD_STAGES[method]
    total = None if stages is None else stages * (levels - 1) + int(grid.ends_at_data)
    with tqdm(total=total, disable=disable, desc=f"ode ({method}), NFE") as progress:
        def velocity(t: Tensor, x_t: Tensor) -> Tensor:
            alpha_t, sigma_t = float(sde.alpha(t)), float(sde.sigma(t))
            _, eps = model(x_t, float(t), alpha_t, sigma_t)
            progress.update()
            return float(sde.drift_coef(t)) * x_t + float(sde.diffusion_sq(t)) / (2.0 * sigma_t) * eps

        if levels > 1:
            # the adaptive solver must land on eps, not overshoot below it (sigma(t < 0) is undefined)
            tolerances = ({"rtol": rtol, "atol": atol, "options": {"step_t": times[-1:]}}
                          if stages is None else {})
            from torchdiffeq import odeint  # here, not at import: it loads scipy (start-up time)

            path = odeint(velocity, x, times, method=method, **tolerances)
            for i in range(1, levels):
                report(callback, i - 1, float(times[i]), path[i], None)
            x = path[-1]
        if grid.ends_at_data:
            t, alpha_t, sigma_t = grid.level(levels - 1)
            x, _ = model(x, t, alpha_t, sigma_t)
            progress.update()
            report(callback, levels - 1, 0.0, x, x)
    return x


def nfe(steps: int, options: dict) -> int | None:
    """(1 / 2 / 4) (steps - 1) + denoise for euler / midpoint / rk4; None for dopri5."""
    stages = METHOD_STAGES[options["method"]]
    if stages is None:
        return None
    return stages * (steps - 1) + int(options["denoise"])


def _tolerance(help_text: str) -> Option:
    return Option(DEFAULT_TOLERANCE, float, help_text, valid=lambda value: value > 0, accepted="be positive")


SAMPLERS = register(SamplerSpec(
    name="ode", fn=ode,
    options={"method": Option("dopri5", str, "torchdiffeq's adaptive dopri5, or a fixed-step method on "
                                             "the grid", choices=tuple(METHOD_STAGES)),
             "rtol": _tolerance("relative tolerance of dopri5"),
             "atol": _tolerance("absolute tolerance of dopri5")},
    nfe=nfe, schedule="log_snr", check=check_options, reference="Song et al. 2021, eq. 13"))
