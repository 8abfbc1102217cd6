"""Checks of a config that every mode shares, run before any expensive work.

Each mode (``sde/modes/*.py``) owns the checks of its own keys and calls these first:
``validate`` for every numeric value (its rule in ``sde/config_rules.py``), the data set,
SDE and network, ``check_sampling`` for the sampler and its options (which only the
sampler's own spec validates, ``sde/samplers/spec.py``). A bad value raises a ValueError
with one line saying what was wrong and what is accepted; ``main.py`` prints it and exits
with code 2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sde import conditioning, data, samplers
from sde.checkpoint import CheckpointError
from sde.checks import require
from sde.config_rules import check_values
from sde.distributed import parse_device
from sde.models import check_model_config, is_exact
from sde.sdes import SDES, create_sde
from sde.workdir import WorkdirError

#: Errors that mean "bad input": main.py prints them as one line and exits with code 2.
USER_ERRORS = (ValueError, FileNotFoundError, CheckpointError, WorkdirError)

SCHEDULES = ("linear", "cosine")


def sampler_options(config) -> dict[str, Any]:
    """The sampler options set in ``config.sampling.options`` (unset placeholders are left out)."""
    return {key: value for key, value in config.sampling.options.items() if value is not None}


def validate(config) -> None:
    """Every numeric value of ``config`` against its rule, then the data set, the SDE and the
    network: one clear ValueError on the first problem."""
    check_values(config)
    require(config.data.dataset in data.DATASETS,
            f"unknown data.dataset {config.data.dataset!r}; accepted: {', '.join(data.DATASETS)}")
    require(config.sde.name in SDES, f"unknown sde.name {config.sde.name!r}; accepted: {', '.join(SDES)}")
    require(config.sde.schedule in SCHEDULES,
            f"unknown sde.schedule {config.sde.schedule!r}; accepted: {', '.join(SCHEDULES)}")
    parse_device(config.device)
    require(isinstance(config.tf32, bool), f"tf32 must be True or False, got {config.tf32!r}")
    require(isinstance(config.quiet, bool), f"quiet must be True or False, got {config.quiet!r}")
    check_model_config(config)
    data.validate_data_config(config)


def check_sampling(config, count: int | None = None) -> None:
    """``config.sampling``: the sampler and its options against the step count (``validate``
    checks the counts), and the labels of ``count`` samples (default ``sampling.num_samples``)."""
    sampling = config.sampling
    require(not (is_exact(config) and sampling.checkpoint),
            f"model.name='exact' has no weights to load; leave sampling.checkpoint empty (got {sampling.checkpoint!r})")
    require(sampling.method in samplers.available(),
            f"unknown sampling.method {sampling.method!r}; accepted: {', '.join(samplers.available())}")
    try:
        samplers.resolve_options(sampling.method, create_sde(config), sampler_options(config), sampling.steps)
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"sampling.options: {error}") from error
    sampling_labels(config, count)


def sampling_labels(config, count: int | None = None):
    """The labels of ``count`` samples (default ``sampling.num_samples``) that
    ``sampling.labels`` asks for (None: no label), checked with ``sampling.guidance`` against
    the model: labels and guidance need a class-conditional model, guidance needs labels and
    a null label that training used (``model.label_dropout`` > 0). A model trained on some
    classes (``data.classes``) is asked for those only."""
    sampling, classes = config.sampling, config.model.num_classes
    count = sampling.num_samples if count is None else count
    require(not sampling.guidance or classes,
            f"sampling.guidance={sampling.guidance:g} needs a class-conditional model (model.num_classes > 0); "
            f"this one is unconditional")
    labels = conditioning.resolve_labels(sampling.labels, count, classes, trained=tuple(config.data.classes))
    require(not sampling.guidance or labels is not None,
            f"sampling.guidance={sampling.guidance:g} guides towards a class: set sampling.labels "
            f"('{conditioning.BALANCED}', one class, or one per sample)")
    require(not sampling.guidance or config.model.label_dropout > 0,
            f"sampling.guidance={sampling.guidance:g} needs the unconditional branch, which this model never "
            f"trained (model.label_dropout=0: the null label was never used); sample with guidance 0")
    return labels


def check_heldout_run(config) -> None:
    """A mode that works on held-out data with given weights: ``eval.heldout_split`` must be a
    split of the data set, and ``sampling.checkpoint``, when set, an existing file."""
    try:
        data.validate_data_config(config, config.eval.heldout_split)
    except ValueError as error:
        raise ValueError(f"eval.heldout_split: {error}") from error
    require(not config.sampling.checkpoint or Path(config.sampling.checkpoint).is_file(),
            f"sampling.checkpoint={config.sampling.checkpoint!r} does not exist")
