"""Interchangeable samplers over one noise-prediction network (see ``registry.py``).

    from sde import samplers
    x, info = samplers.sample("dpm_solver", model, sde, (64, 1, 28, 28), steps=20,
                              generator=[torch.Generator().manual_seed(s) for s in range(64)])
    info["nfe"]  # network evaluations, counted
"""
from sde.samplers.registry import (SAMPLERS, available, config_options, is_stochastic, nfe_for_steps,
                                   parse_option, parse_run, reported_options, resolve_options, sample,
                                   steps_for_nfe)
from sde.samplers.schedules import SCHEDULES
from sde.samplers.spec import COMMON_OPTIONS, Option, SamplerSpec

__all__ = ["COMMON_OPTIONS", "Option", "SAMPLERS", "SCHEDULES", "SamplerSpec", "available",
           "config_options", "is_stochastic", "nfe_for_steps", "parse_option", "parse_run",
           "reported_options", "resolve_options", "sample", "steps_for_nfe"]
