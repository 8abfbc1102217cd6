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
from typing import Any, Callable, Sequence

import torch

from sde.network import model_dtype_device
from sde.samplers.common import Denoiser, Generators, NoiseSource
from sde.samplers.schedules import build_grid, check_steps, is_explicit, resolve_schedule
from sde.samplers.spec import GRID_OPTIONS, SAMPLERS, UNREPORTED, Option, SamplerSpec

Tensor = torch.Tensor

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
    accepted = _spec(name).all_options
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for sampler {name!r}; "
                         f"accepted: {', '.join(sorted(accepted))}")
    return {**_spec(name).defaults(), **options}


def resolve_options(name: str, sde, options: dict[str, Any], steps: int | None = None) -> dict[str, Any]:
    """Defaults filled in and every option checked; unknown names raise a ValueError.

    An explicit schedule (times, or a schedule file, see ``schedules.py``) is resolved to its
    tuple of times, sets ``eps`` to its last time, and, given ``steps``, must have that many.
    """
    spec = _spec(name)
    resolved = _defaults(name, options)
    for key, option in spec.all_options.items():
        option.check(key, resolved[key])
    if spec.check is not None:
        spec.check(resolved, sde, set(options))
    if resolved["schedule"] is None:
        resolved["schedule"] = spec.schedule
    resolved["schedule"] = resolve_schedule(sde, resolved["schedule"])
    if is_explicit(resolved["schedule"]):
        last = resolved["schedule"][-1]
        if "eps" in options and float(options["eps"]) != last:
            raise ValueError(f"eps={options['eps']} differs from the last time of the explicit "
                             f"schedule, {last}; leave eps unset")
        resolved["eps"] = last
    elif not 0.0 < resolved["eps"] < sde.T:
        raise ValueError(f"eps must lie in (0, T={sde.T:g}), got {resolved['eps']}")
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


def config_options() -> dict[str, Option]:
    """Every option a config can set (``sampling.options``): the options with a type of
    every sampler and the common ones. An option of several samplers has one type."""
    found: dict[str, Option] = {}
    for spec in SAMPLERS.values():
        for key, option in spec.all_options.items():
            if option.type is None:
                continue
            if key in found and found[key].type is not option.type:
                raise TypeError(f"option {key!r} has two types: {found[key].type} and {option.type}")
            found.setdefault(key, option)
    return found


def describe(name: str) -> str:
    """Sampler ``name`` in a few lines: its reference, NFE rule's value at 10 steps, default
    schedule, and each option with its type, default, accepted values and meaning."""
    spec = _spec(name)
    nfe = spec.nfe(10, spec.defaults())
    lines = [f"{name}: {spec.reference}", f"  default schedule {spec.schedule}; "
             f"{'stochastic' if spec.stochastic(spec.defaults()) else 'deterministic'} with its defaults; "
             f"NFE at 10 steps: {'adaptive' if nfe is None else nfe}"]
    for key, option in spec.all_options.items():
        kind = option.type.__name__ if option.type is not None else "Python object"
        accepted = f"; one of {', '.join(map(str, option.choices))}" if option.choices else (
            f"; must {option.accepted}" if option.accepted else "")
        lines.append(f"  {key} ({kind}, default {option.default!r}{accepted}): {option.help}")
    return "\n".join(lines)


def parse_option(name: str, key: str, text: str) -> Any:
    """The value of ``key=text`` for sampler ``name``, read through the option's type."""
    _defaults(name, {key: None})  # an unknown key raises, naming the accepted ones
    return _spec(name).all_options[key].parse(key, text)


def parse_run(entry: str) -> tuple[str, int, dict[str, Any]]:
    """``"ddim:50:eta=1.0,schedule=quadratic"`` -> ("ddim", 50, {"eta": 1.0, "schedule": "quadratic"}),
    each value read through its option's type; the options are not yet checked (``resolve_options``)."""
    parts = entry.split(":")
    if len(parts) not in (2, 3) or not parts[1].strip().isdigit():
        raise ValueError(f"run entry {entry!r} is not 'method:steps' or 'method:steps:key=value,...'")
    name = parts[0].strip()
    _spec(name)
    options = {}
    if len(parts) == 3 and parts[2]:
        for item in parts[2].split(","):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"run entry {entry!r}: option {item!r} is not key=value")
            options[key.strip()] = parse_option(name, key.strip(), value)
    return name, int(parts[1]), options


def sample(name: str, model: Callable[[Tensor, Tensor], Tensor], sde, shape: Sequence[int], *,
           steps: int, generator: Generators = None, **options) -> tuple[Tensor, dict[str, Any]]:
    """Draw ``shape[0]`` samples with sampler ``name``: returns ``(x, info)``.

    Args:
      name: one of ``available()``.
      model: ``model(x, t) -> eps`` (the contract of ``sde.network``); called in its parameters' dtype.
      sde: an ``sde.sdes.SDE``.
      shape: [B, ...] of the samples.
      steps: noise levels of the grid (see the module docstring for NFE per sampler).
      generator: None, a ``torch.Generator``, or a list of one generator per sample, in
        which case sample k's x_T and per-step noise come from generator k only.
      options: common ones (``eps``, ``denoise``, ``clip_x0``, ``schedule``, ``callback``,
        ``disable``, ``x_T``) and the sampler's own; see ``SAMPLERS[name].options``.

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
    denoiser = Denoiser(model, dtype, clip_x0=bool(resolved["clip_x0"]))
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
