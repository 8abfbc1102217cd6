"""``--mode align_steps``: fit a sampling schedule to the trained model and its training data.

Fits the ``sampling.steps`` times from T down to ``sampling.options.eps`` (default 1e-3)
that minimise Align Your Steps' bound on the KL divergence of a stochastic sampler
(``sde/samplers/align_steps.py``), starting from ``sampling.options.schedule`` (default:
the sampler's own), on images of the training split drawn as training draws them. Writes
``workdir/schedules/align_steps_<steps>steps_eps<eps>.json``: the times under ``"t"`` (what
``--config.sampling.options.schedule=<file>`` reads), the bound per step before and after,
the fit's settings, the checkpoint and the wall time.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from sde import configuration, data, environment, randomness, samplers
from sde.checks import require
from sde.configuration import sampler_options
from sde.distributed import resolve_device
from sde.inference import load_ema_model
from sde.progress import bar as progress_bar
from sde.samplers import align_steps
from sde.samplers.schedules import is_explicit
from sde.sdes import create_sde
from sde.workdir import Workdir


def training_data_source(config) -> align_steps.DataSource:
    """``draw(count, generator)``: training images scaled (and dequantized, flipped) as the
    training stream scales them; toy points as they are."""
    points, _ = data.load_dataset(config)

    def draw(count: int, generator: torch.Generator) -> torch.Tensor:
        batch = points[randomness.randint(0, len(points), (count,), generator=generator)]
        return data.training_view(batch, random_flip=config.data.random_flip,
                                  dequantize=config.data.dequantize, generator=generator).to(torch.float32)

    return draw


def check(config) -> None:
    """The config of a schedule fit: one clear ValueError on the first problem."""
    configuration.validate(config)
    require(config.sampling.steps >= 3,
            f"align_steps needs sampling.steps >= 3 (the ends stay fixed), got {config.sampling.steps}")
    configuration.check_sampling(config)


def run(config, workdir: str | Path) -> dict[str, Any]:
    """``--mode align_steps``: check the config, then fit (``align``)."""
    check(config)
    return align(config, workdir)


def align(config, workdir: str | Path) -> dict[str, Any]:
    """Run ``--mode align_steps``; returns the record it writes."""
    run = Workdir(workdir)
    sde = create_sde(config)
    options = sampler_options(config)
    method, steps = config.sampling.method, config.sampling.steps
    resolved = samplers.resolve_options(method, sde, options)
    if is_explicit(resolved["schedule"]):
        raise ValueError("sampling.options.schedule is an explicit schedule; align_steps starts "
                         "from a named one (uniform, quadratic, log_snr, karras) or the sampler's default")
    settings = config.align_steps
    device = resolve_device(config.device, tf32=config.tf32)
    model, source, step = load_ema_model(config, workdir, device, config.sampling.checkpoint)
    running_on = environment.announce(device, model=model)
    generator = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    bar = progress_bar(desc=f"align_steps ({steps} levels)", unit="iter", total=settings.iterations)

    def progress(iteration: int, times: torch.Tensor, loss: float) -> None:
        bar.set_postfix(klub=f"{loss:.1f}", refresh=False)
        bar.update(1)

    with bar:
        times, info = align_steps.fit_schedule(
            model, sde, training_data_source(config), steps, eps=float(resolved["eps"]),
            initial=resolved["schedule"], iterations=settings.iterations,
            batch_size=settings.batch_size, learning_rate=settings.learning_rate,
            generator=generator, progress=progress)
    wall_time = time.perf_counter() - start
    record = {"t": times.tolist(), "steps": steps, "eps": float(resolved["eps"]),
              "initial_schedule": resolved["schedule"],
              "klub_initial": info["klub_initial"], "klub_fitted": info["klub_fitted"],
              "klub_initial_total": sum(info["klub_initial"]),
              "klub_fitted_total": sum(info["klub_fitted"]),
              "network_evaluations": info["network_evaluations"], "wall_time_s": wall_time,
              "settings": settings.to_dict(), "seed": config.seed, "data_split": config.data.split,
              "checkpoint": source, "checkpoint_step": step, "sde": repr(sde), "environment": running_on}
    eps_text = f"{record['eps']:g}"
    path = run.write_json(f"{run.schedules.name}/align_steps_{steps}steps_eps{eps_text}.json", record)
    record["message"] = (f"fitted {steps} levels in {wall_time:.0f} s: KLUB "
                         f"{record['klub_initial_total']:.1f} ({resolved['schedule']}) -> "
                         f"{record['klub_fitted_total']:.1f}; wrote {path}; sample with "
                         f"--config.sampling.steps={steps} --config.sampling.options.schedule={path}")
    return record
