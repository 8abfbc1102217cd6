"""How a sampler describes itself: one ``SamplerSpec`` in the sampler's own module.

A spec holds everything the toolkit knows of a sampler: its function, each option with its
type, default, accepted values and meaning (``Option``), its network-evaluation count, its
default schedule, whether it draws noise after x_T, and the checks that involve more than
one option or the SDE. Each sampler module registers its specs (``register``) in
``SAMPLERS``, and ``sde.samplers`` imports every module of the package, so a new sampler is
one new module; the config (``configs/default.py``) builds its ``sampling.options`` from
the same options and ``Option.parse`` reads command-line text through their types. So
options are validated in exactly one place: here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

Tensor = torch.Tensor

#: The smallest time, as in score_sde's samplers (sampling_eps = 1e-3). It is also the
#: first step t_1 = T / N of the N = 1000 DDPM chain, so continuous and discrete grids end
#: at the same noise level: sigma(1e-3) is about 0.01 on VP and about sigma_min on VE.
DEFAULT_EPS = 1e-3
#: The types an option's value may have (``None``: a Python object, not set from a config).
OPTION_TYPES = (bool, int, float, str, None)


@dataclass(frozen=True)
class Option:
    """One sampler option.

    default: its value when not given (None: decided elsewhere, e.g. ``schedule``).
    type: bool, int, float or str (what a config / command line gives it; an int is
      accepted for a float), or None for Python objects (callbacks, tensors).
    help: what it means, one line.
    choices: the accepted values, if they are a list.
    valid, accepted: a test of the value and what it accepts in words, e.g.
      ``lambda v: 0 <= v <= 1`` and "lie in [0, 1]".
    """

    default: Any
    type: type | None
    help: str
    choices: tuple | None = None
    valid: Callable[[Any], bool] | None = None
    accepted: str = ""

    def __post_init__(self):
        if self.type not in OPTION_TYPES:
            raise ValueError(f"option type {self.type!r} is not one of {OPTION_TYPES}")

    def check(self, name: str, value: Any) -> None:
        """Raise a one-line ValueError if ``value`` is not an accepted value of option ``name``.

        ``None`` is accepted where it is the default (the option then means "decided
        elsewhere")."""
        if value is None and self.default is None:
            return
        if self.type is bool and not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
        if self.type is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.type is float and (isinstance(value, bool) or not isinstance(value, (int, float))
                                   or not math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.type is str and not isinstance(value, str) and self.choices is not None:
            raise ValueError(f"{name} must be a string, one of {', '.join(map(str, self.choices))}; got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(map(str, self.choices))}")
        if self.valid is not None and not self.valid(value):
            raise ValueError(f"{name} must {self.accepted}, got {value!r}")

    def parse(self, name: str, text: str) -> Any:
        """The value of command-line ``text`` for this option (``eta=0.5``'s "0.5")."""
        text = text.strip()
        if self.type is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError(f"{name} must be true or false, got {text!r}")
            return text.lower() == "true"
        if self.type in (int, float):
            try:
                return self.type(text)
            except ValueError:
                kind = "an integer" if self.type is int else "a number"
                raise ValueError(f"{name} must be {kind}, got {text!r}") from None
        if self.type is None:
            raise ValueError(f"{name} is a Python object and cannot be given as text")
        return text


#: Options every sampler takes.
COMMON_OPTIONS: dict[str, Option] = {
    "eps": Option(DEFAULT_EPS, float, "the smallest time of the grid, in (0, T)"),
    "denoise": Option(True, bool, "end with the Tweedie step from eps to the data (one more NFE)"),
    "clip_x0": Option(False, bool, "clip the denoised estimate to the data range [-1, 1]"),
    "schedule": Option(None, str, "uniform | quadratic | log_snr | karras, a .json file of times, or "
                                  "(Python) the times; None: the sampler's default"),
    "callback": Option(None, None, "callback(state) after every update (Python)"),
    "disable": Option(False, None, "hide the progress bar (Python; the modes show their own)"),
    "x_T": Option(None, None, "start from this x_T instead of drawing it (Python)"),
}
#: Options not reported in ``info["options"]`` (objects and the progress bar, not settings).
UNREPORTED = ("callback", "x_T", "disable")
#: Options that shape the grid rather than being passed to the sampler function.
GRID_OPTIONS = ("discrete", "spacing")
#: Grids: "continuous" (the schedule's times), "discrete" (rounded to the SDE's N-step
#: chain), "option" (the ``discrete`` option decides).
GRIDS = ("continuous", "discrete", "option")

#: The ``discrete`` option of the samplers that can run on either grid.
DISCRETE = Option(False, bool, "round the grid to the N discrete DDPM steps t_i = i/N (for "
                               "models trained with training.continuous=False)")


def never(options: dict) -> bool:
    return False


def always(options: dict) -> bool:
    return True


def first_order_nfe(steps: int, options: dict) -> int:
    """One evaluation per update: steps - 1 updates between levels, + 1 with ``denoise``."""
    return steps - 1 + int(options["denoise"])


@dataclass(frozen=True)
class SamplerSpec:
    """How ``sample`` runs one sampler, and all it needs to know of it.

    name: the sampler's name (``sampling.method``).
    fn: ``fn(denoiser, x_T, grid, *, sde, noise, callback, disable, **options) -> x``.
    options: its own options (``COMMON_OPTIONS`` come on top).
    nfe(steps, options): network evaluations per sample (None: adaptive, counted).
    schedule: the default schedule (``schedules.SCHEDULES``); BENCHMARKS.md, "Default
      schedules", has the measurement it comes from.
    stochastic(options): whether it draws fresh noise after x_T (samples a reverse SDE)
      rather than mapping x_T deterministically (the probability-flow ODE).
    grid: one of ``GRIDS``.
    check(options, sde, given): checks across options or against the SDE, on the
      resolved options (``given``: the names the caller passed); may fill in options.
    reference: the paper and equation it implements.
    """

    name: str
    fn: Callable[..., Tensor]
    options: dict[str, Option]
    nfe: Callable[[int, dict], int | None]
    schedule: str
    stochastic: Callable[[dict], bool] = never
    grid: str = "continuous"
    check: Callable[[dict, Any, set], None] | None = None
    reference: str = ""
    all_options: dict[str, Option] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.grid not in GRIDS:
            raise ValueError(f"sampler {self.name!r}: grid {self.grid!r} is not one of {GRIDS}")
        if (self.grid == "option") != ("discrete" in self.options):
            raise ValueError(f"sampler {self.name!r}: grid='option' and a 'discrete' option go together")
        clash = set(self.options) & set(COMMON_OPTIONS)
        if clash:
            raise ValueError(f"sampler {self.name!r} redefines common options {sorted(clash)}")
        object.__setattr__(self, "all_options", {**COMMON_OPTIONS, **self.options})

    def defaults(self) -> dict[str, Any]:
        """Every option's default value."""
        return {name: option.default for name, option in self.all_options.items()}


#: name -> ``SamplerSpec`` of every registered sampler, in registration order.
SAMPLERS: dict[str, SamplerSpec] = {}


def register(*specs: SamplerSpec) -> tuple[SamplerSpec, ...]:
    """Add ``specs`` to ``SAMPLERS`` under their names (once each); returns them."""
    for spec in specs:
        if spec.name in SAMPLERS and SAMPLERS[spec.name] is not spec:
            raise ValueError(f"two sampler modules define {spec.name!r}")
        SAMPLERS[spec.name] = spec
    return specs
