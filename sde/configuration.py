"""From a config to a run: validation before any expensive work, sampler options, dispatch."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sde.checkpoint import CheckpointError
from sde.data import DATASETS
from sde.models import MODELS
from sde.sdes import SDES
from sde.workdir import WorkdirError

#: Errors that mean "bad input": main.py prints them as one line and exits with code 2.
USER_ERRORS = (ValueError, FileNotFoundError, CheckpointError, WorkdirError)

SCHEDULES = ("linear", "cosine")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _positive_int(value: Any, name: str) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
             f"{name} must be a positive integer, got {value!r}")


def sampler_options(config) -> dict[str, Any]:
    """The sampler options set in ``config.sampling.options`` (unset placeholders are left out)."""
    return {key: value for key, value in config.sampling.options.items() if value is not None}


def validate(config, mode: str) -> None:
    """Check the config for ``mode``; raise ValueError with one clear line on the first problem."""
    from sde import samplers

    data, model, training, sampling = config.data, config.model, config.training, config.sampling
    _require(data.dataset in DATASETS,
             f"unknown data.dataset {data.dataset!r}; accepted: {', '.join(DATASETS)}")
    _require(model.name in MODELS, f"unknown model.name {model.name!r}; accepted: {', '.join(MODELS)}")
    _require(config.sde.name in SDES,
             f"unknown sde.name {config.sde.name!r}; accepted: {', '.join(SDES)}")
    _require(config.sde.schedule in SCHEDULES,
             f"unknown sde.schedule {config.sde.schedule!r}; accepted: {', '.join(SCHEDULES)}")
    _positive_int(config.sde.num_scales, "sde.num_scales")
    if data.dataset == "toy":
        _require(model.name == "mlp", f"data.dataset='toy' needs model.name='mlp', got {model.name!r}")
    else:
        _require(model.name == "unet",
                 f"data.dataset={data.dataset!r} needs model.name='unet', got {model.name!r}")
        _positive_int(model.nf, "model.nf")
        _positive_int(model.num_res_blocks, "model.num_res_blocks")
        _require(len(model.ch_mult) > 0 and all(isinstance(m, int) and m > 0 for m in model.ch_mult),
                 f"model.ch_mult must be a non-empty tuple of positive integers, got {model.ch_mult!r}")
    _require(0.0 <= model.dropout < 1.0, f"model.dropout must be in [0, 1), got {model.dropout}")
    _require(0.0 <= model.ema_rate < 1.0, f"model.ema_rate must be in [0, 1), got {model.ema_rate}")
    if mode == "train":
        for key in ("batch_size", "n_iters", "log_freq", "snapshot_freq", "sample_freq",
                    "keep_checkpoints", "max_bad_steps"):
            _positive_int(training[key], f"training.{key}")
        _require(training.lr > 0, f"training.lr must be > 0, got {training.lr}")
        _require(training.warmup >= 0, f"training.warmup must be >= 0, got {training.warmup}")
        _require(0.0 < training.eps < 1.0, f"training.eps must be in (0, 1), got {training.eps}")
        _require(training.continuous or not training.likelihood_weighting,
                 "training.likelihood_weighting needs training.continuous=True")
        _require(training.continuous or config.sde.name == "vp",
                 f"training.continuous=False (DDPM) needs sde.name='vp', got {config.sde.name!r}")
        if training.init_weights:
            _require(Path(training.init_weights).suffix in (".safetensors", ".pt"),
                     f"training.init_weights must be .safetensors weights or a checkpoint .pt, "
                     f"got {training.init_weights!r}")
            _require(Path(training.init_weights).is_file(),
                     f"training.init_weights={training.init_weights!r} does not exist")
    if mode == "align_steps":
        _positive_int(config.align_steps.iterations, "align_steps.iterations")
        _positive_int(config.align_steps.batch_size, "align_steps.batch_size")
        _require(config.align_steps.learning_rate > 0,
                 f"align_steps.learning_rate must be > 0, got {config.align_steps.learning_rate}")
        _require(config.sampling.steps >= 3,
                 f"align_steps needs sampling.steps >= 3 (the ends stay fixed), got {config.sampling.steps}")
    if mode == "eval":
        from sde import likelihood
        from sde.sdes import create_sde

        evaluation = config.eval
        _positive_int(evaluation.bpd_num_images, "eval.bpd_num_images")
        _positive_int(evaluation.bpd_repeats, "eval.bpd_repeats")
        _require(evaluation.bpd_dequantization in likelihood.DEQUANTIZATIONS,
                 f"unknown eval.bpd_dequantization {evaluation.bpd_dequantization!r}; "
                 f"accepted: {', '.join(likelihood.DEQUANTIZATIONS)}")
        if evaluation.bpd_dequantization == "truncated_normal":
            try:
                likelihood.truncation_time(create_sde(config), evaluation.bpd_truncation, data.dequantize)
            except ValueError as error:
                raise ValueError(f"eval.bpd_truncation: {error}") from error
    _require(sampling.method in samplers.available(),
             f"unknown sampling.method {sampling.method!r}; accepted: {', '.join(samplers.available())}")
    _positive_int(sampling.steps, "sampling.steps")
    _positive_int(sampling.num_samples, "sampling.num_samples")
    _positive_int(sampling.batch_size, "sampling.batch_size")
    options = sampler_options(config)
    if "eta" in options:
        _require(0.0 <= options["eta"] <= 1.0, f"sampling.options.eta must be in [0, 1], got {options['eta']}")
    if "eps" in options:
        _require(0.0 < options["eps"] < 1.0, f"sampling.options.eps must be in (0, 1), got {options['eps']}")
    if mode != "compare":  # compare takes its samplers and options from compare.runs
        from sde.sdes import create_sde

        sde = create_sde(config)
        try:
            samplers.resolve_options(sampling.method, sde, options, sampling.steps)
        except (ValueError, FileNotFoundError) as error:
            raise type(error)(f"sampling.options: {error}") from error


def run_mode(mode: str, config, workdir: str) -> dict[str, Any] | None:
    """Validate, then run one mode; returns the mode's summary."""
    validate(config, mode)
    from sde import data

    data.validate_data_config(config)
    if mode == "train":
        from sde.run_train import train

        summary = train(config, workdir)
        summary["message"] = (f"trained to step {summary['step']} in {summary['wall_time_s']:.0f} s; "
                              f"last loss {summary['last_loss']:.4f}; workdir {workdir}")
        return summary
    if mode == "sample":
        from sde.run_sample import sample

        return sample(config, workdir)
    if mode == "eval":
        from sde.run_eval import evaluate

        return evaluate(config, workdir)
    if mode == "compare":
        from sde.run_compare import compare

        return compare(config, workdir)
    if mode == "export":
        from sde.run_export import export

        return export(config, workdir)
    if mode == "align_steps":
        from sde.run_align_steps import align

        return align(config, workdir)
    raise ValueError(f"unknown mode {mode!r}; accepted: train, sample, eval, compare, export, align_steps")
