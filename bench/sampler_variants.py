"""Which option sets of our samplers the peer and overhead benchmarks run, and their labels."""
from __future__ import annotations

import json

from sde import samplers
from sde.samplers import ode as ode_module

#: Option variants run besides each sampler's defaults: order 3, and Karras et al.'s noise
#: levels (the schedule diffusers' DPM-Solver is best with on the released model); for the
#: SDE solver the grid ending at eps = 0.02 (noise level 0.077 on the VP SDE) instead of 1e-3,
#: its best 10-NFE setting on the released model (chosen from five values on that benchmark,
#: BENCHMARKS.md), on log-SNR and on Karras levels (the two options that each helped at
#: 10 NFE, combined), so that the peer table holds our best options beside diffusers' best.
EXTRA_VARIANTS = {"dpm_solver": [{"order": 3}, {"schedule": "karras"}],
                  "dpm_solver_sde": [{"eps": 0.02}, {"eps": 0.02, "schedule": "karras"}]}


def sampler_variants(name: str) -> list[dict]:
    """Option sets of sampler ``name``: its defaults, or, when those are adaptive (the
    dopri5 ODE, whose NFE no step count fixes), each fixed-step method; then
    ``EXTRA_VARIANTS``."""
    if samplers.nfe_for_steps(name, 1) is None:
        return [{"method": method} for method, stages in ode_module.METHOD_STAGES.items()
                if stages is not None] + EXTRA_VARIANTS.get(name, [])
    return [{}] + EXTRA_VARIANTS.get(name, [])


def variant_label(name: str, options: dict) -> str:
    """``name`` or ``name (key=value, ...)``."""
    return name + (" (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")" if options else "")


#: The common options that change what a sampler computes (``COMMON_OPTIONS`` without the
#: objects and the progress bar), part of every cache key beside the sampler's own options.
KEYED_COMMON_OPTIONS = ("eps", "denoise", "clip_x0", "schedule")


def settings(name: str, options: dict, sde) -> str:
    """Every setting of a run with the defaults filled in (the sampler's own options and
    ``KEYED_COMMON_OPTIONS``), as a cache-key part: a run stored before a default changed is
    not mistaken for one with the new default."""
    resolved = samplers.resolve_options(name, sde, options)
    keyed = list(samplers.SAMPLERS[name].options) + list(KEYED_COMMON_OPTIONS)
    return json.dumps({key: resolved[key] for key in keyed}, sort_keys=True)
