"""The sampler registry and the one entry point, ``sample(name, model, sde, shape, *, steps, ...)``.

Every sampler is a plain function ``fn(model, x, grid, *, sde, noise, callback, disable,
**its_options) -> x`` over a ``NoiseGrid`` (k-diffusion's uniform signature); ``sample``
resolves the options, builds the grid, draws x_T, counts the network evaluations and
reports them in ``info``.

Steps and NFE. ``steps`` is the number of noise levels of the grid, t_0 = T > ... >
t_{steps-1} = eps (see ``schedules.py``). With ``denoise=True`` (the default) the sampler's
last update goes from eps to the data, and for ancestral, ddim, dpm_solver(_sde), unipc and
heun that update is the sampler's own (DDPM's last step with z = 0, DDIM's alphabar_0 = 1,
DPM-Solver's and UniPC's first-order step to lambda = +inf, EDM's Euler step to sigma = 0),
all equal to the Tweedie step x0_hat = (x - sigma eps) / alpha at eps; ode, euler_maruyama
and pc take that Tweedie step. With ``denoise=False`` the sampler stops at eps, and returns x_eps,
which still carries noise of scale sigma(eps), one evaluation fewer. Network evaluations:

    ancestral, ddim, dpm_solver(_sde), unipc, euler_maruyama   steps - 1 + denoise
    heun                                                       2 (steps - 1) + denoise
    pc                                                         (steps - 1 + denoise) (1 + n_corrector)
    ode (euler / midpoint / rk4)                               (1 / 2 / 4) (steps - 1) + denoise
    ode (dopri5)                                               adaptive (counted) + denoise
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from sde.samplers import ancestral as ancestral_module
from sde.samplers import ddim as ddim_module
from sde.samplers import dpm_solver as dpm_solver_module
from sde.samplers import heun as heun_module
from sde.samplers import ode as ode_module
from sde.samplers import sde_solvers
from sde.samplers import unipc as unipc_module
from sde.samplers.common import Denoiser, Generators, NoiseSource, model_dtype_device
from sde.samplers.schedules import (SCHEDULE_DEFAULTS, build_grid, check_steps, is_explicit,
                                   resolve_schedule)

Tensor = torch.Tensor

#: The smallest time, as in score_sde's samplers (sampling_eps = 1e-3). It is also the
#: first step t_1 = T / N of the N = 1000 DDPM chain, so continuous and discrete grids end
#: at the same noise level: sigma(1e-3) is about 0.01 on VP and about sigma_min on VE.
DEFAULT_EPS = 1e-3

#: Options every sampler accepts, with their defaults (``schedule`` None: the sampler's own).
COMMON_OPTIONS: dict[str, Any] = {
    "eps": DEFAULT_EPS, "denoise": True, "clip_x0": False, "schedule": None,
    "callback": None, "disable": False, "x_T": None,
}
#: Options not reported in ``info["options"]`` (objects and the progress bar, not settings).
UNREPORTED = ("callback", "x_T", "disable")
#: Sampler options that shape the grid rather than being passed to the sampler function.
GRID_OPTIONS = ("discrete", "spacing")


@dataclass(frozen=True)
class SamplerSpec:
    """How ``sample`` runs one sampler.

    fn: the sampler function. options: its own options and their defaults. check:
    validates the resolved options, ``check(options, sde, given)`` with ``given`` the names
    the caller passed (None: nothing to check). nfe(steps, options): network evaluations
    (None: adaptive). grid: "continuous", "discrete" (the SDE's N-step chain), or
    "option" (the ``discrete`` option decides). stochastic(options): whether it draws fresh
    noise after x_T (a reverse-SDE sampler) rather than integrating the probability-flow ODE.
    """

    fn: Callable[..., Tensor]
    options: dict[str, Any]
    check: Callable[[dict, Any, set], None] | None
    nfe: Callable[[int, dict], int | None]
    grid: str = "continuous"
    stochastic: Callable[[dict], bool] = lambda options: False


def _always(options: dict) -> bool:
    return True


def _first_order_nfe(steps: int, options: dict) -> int:
    return steps - 1 + int(options["denoise"])


def _ode_nfe(steps: int, options: dict) -> int | None:
    stages = ode_module.METHOD_STAGES[options["method"]]
    if stages is None:
        return None
    return stages * (steps - 1) + int(options["denoise"])


SAMPLERS: dict[str, SamplerSpec] = {
    "ancestral": SamplerSpec(ancestral_module.ancestral, {"variance": "beta_tilde"},
                             ancestral_module.check_options, _first_order_nfe, grid="discrete",
                             stochastic=_always),
    "ddim": SamplerSpec(ddim_module.ddim, {"eta": 0.0, "discrete": False, "spacing": None},
                        ddim_module.check_options, _first_order_nfe, grid="option",
                        stochastic=lambda options: options["eta"] > 0),
    "ode": SamplerSpec(ode_module.ode, {"method": "dopri5", "rtol": ode_module.DEFAULT_TOLERANCE,
                                        "atol": ode_module.DEFAULT_TOLERANCE},
                       ode_module.check_options, _ode_nfe),
    "euler_maruyama": SamplerSpec(sde_solvers.euler_maruyama, {}, None, _first_order_nfe,
                                  stochastic=_always),
    "pc": SamplerSpec(sde_solvers.pc, {"snr": 0.16, "n_corrector": 1, "corrector_norm": "sample",
                                       "predictor": "ancestral"},
                      sde_solvers.check_pc_options,
                      lambda steps, o: (steps - 1 + int(o["denoise"])) * (1 + o["n_corrector"]),
                      stochastic=_always),
    "dpm_solver": SamplerSpec(dpm_solver_module.dpm_solver,
                              {"order": 2, "lower_order_final": True, "discrete": False},
                              dpm_solver_module.check_options, _first_order_nfe, grid="option"),
    "dpm_solver_sde": SamplerSpec(dpm_solver_module.dpm_solver_sde,
                                  {"order": 2, "eta": 1.0, "solver_type": "midpoint", "discrete": False},
                                  dpm_solver_module.check_sde_options, _first_order_nfe,
                                  grid="option", stochastic=lambda options: options["eta"] > 0),
    "unipc": SamplerSpec(unipc_module.unipc,
                         {"order": 2, "variant": "bh2", "lower_order_final": True, "corrector": True,
                          "discrete": False},
                         unipc_module.check_options, _first_order_nfe, grid="option"),
    "heun": SamplerSpec(heun_module.heun, {"discrete": False}, None,
                        lambda steps, o: 2 * (steps - 1) + int(o["denoise"]), grid="option"),
}


def available() -> list[str]:
    """Names of the registered samplers."""
    return list(SAMPLERS)


def _spec(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; accepted: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def _defaults(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Every option of sampler ``name`` with its default, then ``options``; unknown names raise."""
    accepted = {**COMMON_OPTIONS, **_spec(name).options}
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for sampler {name!r}; "
                         f"accepted: {', '.join(sorted(accepted))}")
    return {**accepted, **options}


def resolve_options(name: str, sde, options: dict[str, Any], steps: int | None = None) -> dict[str, Any]:
    """Defaults filled in and every option checked; unknown names raise a ValueError.

    An explicit schedule (times, or a schedule file, see ``schedules.py``) is resolved to its
    tuple of times, sets ``eps`` to its last time, and, given ``steps``, must have that many.
    """
    spec = _spec(name)
    resolved = _defaults(name, options)
    if spec.check is not None:
        spec.check(resolved, sde, set(options))
    if resolved["schedule"] is None:
        resolved["schedule"] = SCHEDULE_DEFAULTS[name]
    resolved["schedule"] = resolve_schedule(sde, resolved["schedule"])
    if is_explicit(resolved["schedule"]):
        last = resolved["schedule"][-1]
        if "eps" in options and float(options["eps"]) != last:
            raise ValueError(f"eps={options['eps']} differs from the last time of the explicit "
                             f"schedule, {last}; leave eps unset")
        resolved["eps"] = last
    if steps is not None:
        check_steps(resolved["schedule"], steps)
    return resolved


def reported_options(name: str, sde, options: dict[str, Any]) -> dict[str, Any]:
    """Every setting ``sample`` would run ``name`` with (``resolve_options`` without the
    objects of ``UNREPORTED``): what a record should hold, so that a later change of a default
    cannot change what it says was run. This is also ``info["options"]``."""
    return _reported(resolve_options(name, sde, options))


def _reported(resolved: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in resolved.items() if key not in UNREPORTED}


def nfe_for_steps(name: str, steps: int, **options) -> int | None:
    """Network evaluations of ``sampler(steps)`` with these options (None if adaptive)."""
    _check_steps(steps)
    return _spec(name).nfe(steps, _defaults(name, options))


def is_stochastic(name: str, **options) -> bool:
    """Whether ``name`` with these options draws noise after x_T (samples a reverse SDE) rather
    than mapping x_T deterministically (the probability-flow ODE)."""
    return _spec(name).stochastic(_defaults(name, options))


def steps_for_nfe(name: str, nfe: int, **options) -> int:
    """The largest ``steps`` whose evaluations do not exceed ``nfe`` (check ``info['nfe']``)."""
    if nfe_for_steps(name, 1, **options) is None:
        raise ValueError(f"{name} with these options is adaptive; its NFE cannot be set by steps")
    if nfe_for_steps(name, 1, **options) > nfe:
        raise ValueError(f"{name} needs more than {nfe} evaluations even for steps=1")
    steps = 1
    while nfe_for_steps(name, steps + 1, **options) <= nfe:
        steps += 1
    return steps


def sample(name: str, model: Callable[[Tensor, Tensor], Tensor], sde, shape: Sequence[int], *,
           steps: int, generator: Generators = None, **options) -> tuple[Tensor, dict[str, Any]]:
    """Draw ``shape[0]`` samples with sampler ``name``: returns ``(x, info)``.

    Args:
      name: one of ``available()``.
      model: ``model(x, t) -> eps`` (DESIGN.md contract); called in its parameters' dtype.
      sde: an ``sde.sdes.SDE``.
      shape: [B, ...] of the samples.
      steps: noise levels of the grid (see the module docstring for NFE per sampler).
      generator: None, a ``torch.Generator``, or a list of one generator per sample, in
        which case sample k's x_T and per-step noise come from generator k only.
      options: common ones (``eps``, ``denoise``, ``clip_x0``, ``schedule``, ``callback``,
        ``disable``, ``x_T``) and the sampler's own; see ``SAMPLERS``.

    Returns:
      x in the working dtype (x_T's dtype, else the model's, else float32) and ``info``
      with ``nfe`` (counted network evaluations), ``sampler``, ``steps``, ``t`` (the grid's
      times, 0.0 for the data) and ``options`` (all resolved settings).
    """
    spec = _spec(name)
    _check_steps(steps)
    resolved = resolve_options(name, sde, options, steps)
    x_T = resolved["x_T"]
    shape = tuple(shape)
    param_dtype, param_device = model_dtype_device(model)
    if x_T is not None:
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
        dtype, device = x_T.dtype, x_T.device
    else:
        dtype = param_dtype or torch.float32
        first = generator[0] if isinstance(generator, (list, tuple)) and generator else generator
        device = param_device or (first.device if isinstance(first, torch.Generator)
                                  else torch.device("cpu"))
    noise = NoiseSource(generator, shape[0], device, dtype)
    discrete = spec.grid == "discrete" or (spec.grid == "option" and resolved["discrete"])
    steps = int(steps)
    grid = build_grid(sde, steps, resolved["schedule"], float(resolved["eps"]),
                      discrete=discrete, to_data=bool(resolved["denoise"]))
    denoiser = Denoiser(model, param_dtype or dtype, clip_x0=bool(resolved["clip_x0"]))
    sampler_options = {key: resolved[key] for key in spec.options if key not in GRID_OPTIONS}
    with torch.no_grad():
        x = (noise.prior(sde, shape) if x_T is None else x_T).to(torch.float64)
        x = spec.fn(denoiser, x, grid, sde=sde, noise=noise, callback=resolved["callback"],
                    disable=bool(resolved["disable"]), **sampler_options)
    info = {
        "sampler": name,
        "nfe": denoiser.nfe,
        "steps": steps,
        "t": grid.t.tolist(),
        "options": _reported(resolved),
    }
    return x.to(dtype), info
