"""``--mode latent``: held-out data through the probability-flow ODE's latent space (``sde.latent``).

``latent.task``:

* ``reconstruct``: ``latent.num_images`` images of ``eval.heldout_split`` (the fixed evaluation
  subset) encoded to x_T and decoded back with ``latent.method`` (``ddim``: DDIM inversion;
  ``dpm_solver_2``; ``adaptive``: dopri5 at ``latent.rtol``/``atol``) and ``latent.steps``.
  Writes ``workdir/latent/reconstruct_<method>_<steps>steps.png`` (originals above their
  reconstructions), ``.json`` (per-image RMSE and PSNR on the [-1, 1] scale, NFE per sample
  each way, wall time) and ``.npz`` (``inputs``, ``reconstructions``, ``latents``).
* ``interpolate``: ``latent.pairs`` pairs of held-out images, each a row of ``latent.frames``
  decodings of the ``latent.kind`` (slerp or lerp) path between their latents; the ends are
  the two images' reconstructions. Writes ``interpolate_<kind>_<method>_<steps>steps.png``,
  ``.json`` and ``.npz`` (``inputs``, ``paths`` [pairs, frames, ...]).

Adaptive runs are named by ``tol<rtol>`` (and ``_atol<atol>`` when it differs), and a
non-default ``latent.eps`` adds ``_eps<eps>``. Point data get the arrays without the picture.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sde import configuration, data, environment, images, latent
from sde.checkpoint import atomic_write
from sde.checks import require
from sde.distributed import resolve_device
from sde.inference import load_ema_model
from sde.sdes import create_sde
from sde.workdir import Workdir

TASKS = ("reconstruct", "interpolate")


def _options(config) -> dict[str, Any]:
    cfg = config.latent
    return {"method": cfg.method, "steps": cfg.steps, "eps": cfg.eps, "rtol": cfg.rtol, "atol": cfg.atol}


def check(config) -> None:
    """The config of a latent run: one clear ValueError on the first problem."""
    configuration.validate(config)
    cfg = config.latent
    require(cfg.task in TASKS, f"unknown latent.task {cfg.task!r}; accepted: {', '.join(TASKS)}")
    require(cfg.kind in latent.INTERPOLATIONS,
            f"unknown latent.kind {cfg.kind!r}; accepted: {', '.join(latent.INTERPOLATIONS)}")
    try:
        latent.check_options(create_sde(config), **_options(config))
    except ValueError as error:
        raise ValueError(f"latent.{error}") from error
    configuration.check_heldout_run(config)


def run(config, workdir: str | Path) -> dict[str, Any]:
    """``--mode latent``: check the config, then run the task (``latent_task``)."""
    check(config)
    return latent_task(config, workdir)


def _name(config) -> str:
    """The run's file name: task, method, its budget, and eps where it is not the default."""
    cfg = config.latent
    if cfg.method == "adaptive":
        budget = f"tol{cfg.rtol:g}" + (f"_atol{cfg.atol:g}" if cfg.atol != cfg.rtol else "")
    else:
        budget = f"{cfg.steps}steps"
    prefix = cfg.task if cfg.task == "reconstruct" else f"interpolate_{cfg.kind}"
    return f"{prefix}_{cfg.method}_{budget}" + (f"_eps{cfg.eps:g}" if cfg.eps != latent.DEFAULT_EPS else "")


def latent_task(config, workdir: str | Path) -> dict[str, Any]:
    """Run ``--mode latent``; returns the JSON record it writes."""
    cfg, device = config.latent, resolve_device(config.device)
    sde = create_sde(config)
    model, source, step = load_ema_model(config, workdir, device, config.sampling.checkpoint)
    running_on = environment.announce(device, model=model)
    is_image = data.get_dataset(config.data.dataset).is_image
    raw, _ = data.load_dataset(config, split=config.eval.heldout_split)
    count = cfg.num_images if cfg.task == "reconstruct" else 2 * cfg.pairs
    require(len(raw) >= count, f"latent.{'num_images' if cfg.task == 'reconstruct' else 'pairs'} asks for "
                               f"{count} images of {config.eval.heldout_split!r}, which has {len(raw)}")
    chosen, _ = data.evaluation_subset(raw, None, count, seed=config.seed)
    x = (data.uint8_to_float(chosen, dequantize=False) if is_image else chosen.to(torch.float64)).to(device)
    options = _options(config)
    name = _name(config)
    run = Workdir(workdir)  # once the inputs are known to be good: a refused run leaves no folder
    started = time.perf_counter()
    record: dict[str, Any] = {"task": cfg.task, "options": options, "checkpoint": source, "checkpoint_step": step,
                              "sde": repr(sde), "split": config.eval.heldout_split, "environment": running_on}
    if cfg.task == "reconstruct":
        back, info = latent.reconstruct(model, sde, x, **options)
        record.update({key: info[key] for key in ("rmse", "psnr", "rmse_mean", "psnr_mean", "nfe_encode",
                                                  "nfe_decode")})
        rows = [x, back]
        message = (f"{count} images through {cfg.method}: RMSE {info['rmse_mean']:.4f}, PSNR "
                   f"{info['psnr_mean']:.2f} dB ({info['nfe_encode']} + {info['nfe_decode']} NFE)")
    else:
        rows = []
        for pair in range(cfg.pairs):
            path, info = latent.interpolate(model, sde, x[2 * pair], x[2 * pair + 1], frames=cfg.frames,
                                            kind=cfg.kind, **options)
            rows.append(path)
        # network evaluations per sample, as for reconstruct (every pair costs the same)
        record.update(kind=cfg.kind, frames=cfg.frames, pairs=cfg.pairs, nfe_encode=info["nfe_encode"],
                      nfe_decode=info["nfe_decode"])
        message = f"{cfg.pairs} {cfg.kind} interpolations of {cfg.frames} frames through {cfg.method}"
    record["wall_time_s"] = time.perf_counter() - started
    record["files"] = {"record": f"{name}.json", "arrays": f"{name}.npz"}
    arrays = {"inputs": x}
    if cfg.task == "reconstruct":
        arrays.update(reconstructions=rows[1], latents=info["x_T"])
    else:
        arrays["paths"] = torch.stack(rows)
    arrays = {key: value.float().cpu().numpy() for key, value in arrays.items()}
    atomic_write(run.latent / f"{name}.npz", lambda handle: np.savez_compressed(handle, **arrays))
    if is_image:
        strip = torch.cat([row.float().cpu().clamp(-1, 1) for row in rows])
        grid = images.image_grid(data.float_to_uint8(strip, dequantized=False).numpy(),
                                 nrow=count if cfg.task == "reconstruct" else cfg.frames)
        images.save_png(grid, run.latent / f"{name}.png")
        record["files"]["grid"] = f"{name}.png"
    images.save_json(record, run.latent / f"{name}.json")
    record["message"] = f"{message} in {record['wall_time_s']:.1f} s -> {run.latent / (name + '.json')}"
    return record


__all__ = ["TASKS", "check", "latent_task", "run"]
