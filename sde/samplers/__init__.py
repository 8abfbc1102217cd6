"""Interchangeable samplers over one noise-prediction network (see ``registry.py``).

    from sde import samplers
    x, info = samplers.sample("dpm_solver", model, sde, (64, 1, 28, 28), steps=20,
                              generator=[torch.Generator().manual_seed(s) for s in range(64)])
    info["nfe"]  # network evaluations, counted
    print(samplers.describe("dpm_solver"))  # its options, defaults and accepted values
"""
import importlib
import pkgutil

from sde.samplers.registry import (SAMPLERS, available, config_options, describe, is_stochastic, nfe_for_steps,
                                   parse_option, parse_run, reported_options, resolve_options, sample,
                                   steps_for_nfe)
from sde.samplers.schedules import SCHEDULES
from sde.samplers.spec import COMMON_OPTIONS, Option, SamplerSpec, register

#: Sampler modules, in the order ``available()`` lists their samplers; every other module of
#: the package is imported after them, in name order, and registers its samplers too.
MODULE_ORDER = ("ancestral", "ddim", "ode", "sde_solvers", "dpm_solver", "unipc", "heun")
for _name in [*MODULE_ORDER, *sorted({info.name for info in pkgutil.iter_modules(__path__)} - set(MODULE_ORDER))]:
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["COMMON_OPTIONS", "Option", "SAMPLERS", "SCHEDULES", "SamplerSpec", "available",
           "config_options", "describe", "is_stochastic", "nfe_for_steps", "parse_option", "parse_run",
           "register", "reported_options", "resolve_options", "sample", "steps_for_nfe"]
