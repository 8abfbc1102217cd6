"""``--mode inverse``: inpainting, colorization, super-resolution and denoising of held-out
images with the unconditional network (``sde.inverse``).

``inverse.num_images`` images of ``eval.heldout_split`` (the fixed evaluation subset) are
observed through the projector of ``inverse.task`` (``inpaint`` with ``inverse.mask`` = box,
half or random; ``colorize``, colour data only; ``superres`` by ``inverse.factor``;
``denoise``: every pixel, through noise) and completed by ``inverse.method`` (``replacement``
or ``smc`` with ``inverse.particles``) over ``inverse.steps`` steps. With ``inverse.noise`` > 0
the observation is noisy, y = A x + noise * n (n drawn from ``config.seed``, the same for
every method), and the methods condition down to the level of that noise only
(``sde.inverse``). Writes ``workdir/inverse/<name>.png`` (rows: the observation, the
completions, the originals) and ``<name>.json``: NFE per image, wall time, the largest
deviation of the observed part from the observation, the RMSE to the originals, and on data with a classifier (MNIST)
the fraction of completions it assigns the original's class and its mean confidence.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from sde import configuration, data, environment, images, inverse, randomness
from sde.checks import require
from sde.distributed import resolve_device
from sde.inference import load_ema_model
from sde.quality import classifier_metrics_for
from sde.sdes import create_sde
from sde.workdir import Workdir

TASKS = ("inpaint", "colorize", "superres", "denoise")
#: The observation noise is drawn from seed ``config.seed`` + this (an arbitrary constant), a
#: stream that neither the random mask (``config.seed``) nor the sampler (``sampling.seed``) uses.
OBSERVATION_SEED_OFFSET = 7919
MASKS = ("box", "half", "random")


def check(config) -> None:
    """The config of an inverse-problem run: one clear ValueError on the first problem."""
    configuration.validate(config)
    cfg = config.inverse
    require(data.get_dataset(config.data.dataset).is_image,
            f"--mode inverse completes images; data.dataset={config.data.dataset!r} holds points "
            f"(use sde.inverse from Python)")
    require(cfg.task in TASKS, f"unknown inverse.task {cfg.task!r}; accepted: {', '.join(TASKS)}")
    require(cfg.method in inverse.METHODS,
            f"unknown inverse.method {cfg.method!r}; accepted: {', '.join(inverse.METHODS)}")
    require(cfg.mask in MASKS, f"unknown inverse.mask {cfg.mask!r}; accepted: {', '.join(MASKS)}")
    require(cfg.task != "colorize" or config.data.num_channels == 3,
            f"inverse.task='colorize' needs colour images (data.num_channels=3); "
            f"{config.data.dataset} has {config.data.num_channels} channel(s)")
    require(cfg.task != "denoise" or cfg.noise > 0,
            "inverse.task='denoise' observes every pixel through noise: set inverse.noise > 0 (its standard "
            "deviation on the [-1, 1] scale)")
    require(cfg.task != "superres" or config.data.image_size % cfg.factor == 0,
            f"inverse.factor={cfg.factor} must divide data.image_size={config.data.image_size}")
    require(cfg.eps < create_sde(config).T, f"inverse.eps must be below T, got {cfg.eps}")
    try:
        inverse.observation_level(create_sde(config), cfg.noise)
    except ValueError as error:
        raise ValueError(f"inverse.{error}") from None
    configuration.check_heldout_run(config)


def run(config, workdir: str | Path) -> dict[str, Any]:
    """``--mode inverse``: check the config, then complete the images (``complete``)."""
    check(config)
    return complete(config, workdir)


def projector_for(config, generator: torch.Generator) -> inverse.Projector:
    """The projector of ``config.inverse`` for one image of the configured data."""
    cfg, shape = config.inverse, data.sample_shape(config, 1)[1:]
    if cfg.task == "colorize":
        return inverse.ChannelMean()
    if cfg.task == "superres":
        return inverse.BlockMean(cfg.factor)
    if cfg.task == "denoise":  # every pixel observed; the noise is what is removed
        return inverse.Mask(torch.ones(shape, dtype=torch.bool))
    size = shape[-1]
    if cfg.mask == "box":
        return inverse.Mask(inverse.box_mask(shape, size // 4, size // 4, size // 2, size // 2))
    if cfg.mask == "half":
        return inverse.Mask(inverse.half_mask(shape))
    return inverse.Mask(inverse.random_mask(shape, cfg.keep, generator))


def run_name(config) -> str:
    cfg = config.inverse
    task = f"inpaint_{cfg.mask}" if cfg.task == "inpaint" else cfg.task
    return (f"{task}_{cfg.method}_{cfg.steps}steps" + (f"_{cfg.particles}particles" if cfg.method == "smc" else "")
            + (f"_noise{cfg.noise:g}" if cfg.noise > 0 else ""))


def complete(config, workdir: str | Path) -> dict[str, Any]:
    """Run ``--mode inverse``; returns the JSON record it writes."""
    cfg, device = config.inverse, resolve_device(config.device)
    sde = create_sde(config)
    model, source, step = load_ema_model(config, workdir, device, config.sampling.checkpoint)
    running_on = environment.announce(device, model=model)
    raw, labels = data.load_dataset(config, split=config.eval.heldout_split)
    require(len(raw) >= cfg.num_images, f"inverse.num_images={cfg.num_images} exceeds the {len(raw)} images of "
                                        f"{config.eval.heldout_split!r}")
    chosen, chosen_labels = data.evaluation_subset(raw, labels, cfg.num_images, seed=config.seed)
    generator = torch.Generator(device=device).manual_seed(config.sampling.seed)
    projector = projector_for(config, torch.Generator().manual_seed(config.seed))
    name = run_name(config)
    run = Workdir(workdir)  # the inputs are good: a refused run leaves no folder
    originals = data.uint8_to_float(chosen, dequantize=False).to(device=device, dtype=torch.float64)
    options = {"steps": cfg.steps, "eps": cfg.eps, "noise": cfg.noise, "generator": generator,
               **({"particles": cfg.particles} if cfg.method == "smc" else {})}
    # y = P (x + noise * n): the same observation noise for every method and sampling seed, from
    # a stream of its own (neither the random mask's nor the sampler's)
    noise_draw = randomness.randn(originals.shape, dtype=torch.float64, device=device,
                                  generator=torch.Generator().manual_seed(config.seed + OBSERVATION_SEED_OFFSET))
    observations = projector.observe(originals + cfg.noise * noise_draw)
    started = time.perf_counter()
    completed, nfe = [], 0
    for first in range(0, len(originals), config.eval.batch_size):
        observation = observations[first:first + config.eval.batch_size]
        x, info = inverse.solve(cfg.method, model, sde, observation, projector, **options)
        completed.append(x)
        nfe = info["nfe"]
    completed = torch.cat(completed)
    wall_time = time.perf_counter() - started
    deviation = float((projector.project(completed) - observations).abs().max())
    rmse = float((completed - originals).pow(2).mean().sqrt())  # per value, on the [-1, 1] scale
    completed_uint8 = data.float_to_uint8(completed.float().cpu().clamp(-1, 1), dequantized=False)
    record: dict[str, Any] = {"observation_t": info["observation_t"],
        "task": cfg.task, "method": cfg.method, "steps": cfg.steps, "eps": cfg.eps, "noise": cfg.noise,
        "num_images": len(chosen), "split": config.eval.heldout_split, "nfe_per_image": nfe, "wall_time_s": wall_time,
        "observed_max_deviation": deviation, "rmse_to_originals": rmse, "checkpoint": source,
        "checkpoint_step": step, "sde": repr(sde),
        "environment": running_on, **({"mask": cfg.mask} if cfg.task == "inpaint" else {}),
        **({"keep": cfg.keep} if cfg.task == "inpaint" and cfg.mask == "random" else {}),
        **({"particles": cfg.particles} if cfg.method == "smc" else {}),
        **({"factor": cfg.factor} if cfg.task == "superres" else {})}
    metrics = classifier_metrics_for(config, device)
    if metrics is not None and chosen_labels is not None:
        from evaluation.classifier import images_to_input

        with torch.no_grad():
            probabilities = torch.softmax(metrics.classifier(images_to_input(completed_uint8, device)), dim=1)
        predicted = probabilities.argmax(1).cpu()
        record["classifier"] = {
            "accuracy": float((predicted == chosen_labels).double().mean()),
            "mean_confidence": float(probabilities.max(1).values.mean()),
            "labels": chosen_labels.tolist(), "predicted": predicted.tolist()}
    shown = observations.float().cpu()  # P y: unobserved pixels are 0, mid-grey
    strip = torch.cat([shown.clamp(-1, 1), completed.float().cpu().clamp(-1, 1), originals.float().cpu()])
    grid = images.image_grid(data.float_to_uint8(strip, dequantized=False).numpy(), nrow=len(chosen))
    images.save_png(grid, run.inverse / f"{name}.png")
    record["files"] = {"grid": f"{name}.png", "record": f"{name}.json"}
    images.save_json(record, run.inverse / f"{name}.json")
    accuracy = (f"; classifier agrees with the original's class on {record['classifier']['accuracy']:.0%}"
                if "classifier" in record else "")
    record["message"] = (f"{len(chosen)} images, {cfg.task} by {cfg.method} ({nfe} NFE each) in {wall_time:.1f} s"
                         f"{accuracy} -> {run.inverse / (name + '.png')}")
    return record


__all__ = ["MASKS", "TASKS", "check", "complete", "projector_for", "run", "run_name"]
