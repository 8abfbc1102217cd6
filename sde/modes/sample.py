"""``--mode sample``: generate ``sampling.num_samples`` images with any sampler.

Writes into ``workdir/samples/`` (``<name>`` = ``<method>_<steps>steps_seed<seed>``):
``<name>.png`` (grid of the first 100), ``<name>.npz`` (``images``: uint8 [N, C, H, W];
point data: ``points`` float32 [N, D]), ``<name>.json`` (sampler, the options given and every
setting resolved (``resolved_options``), steps, NFE, seed,
wall time, checkpoint), and with ``sampling.save_trajectory`` ``<name>_trajectory.png``:
rows of x_T -> x_0 for a few samples, then rows of the forward noising of real images at
the same times. Point data always get ``<name>_flow.png`` (``sde.toy_figures``): the data
noised forward and the sampler's way back, with reverse SDE and ODE paths. A class-conditional
model draws the classes of ``sampling.labels`` with guidance ``sampling.guidance``
(``sde.conditioning``): the labels are in the .npz (``labels``) and the .json, the name ends
in ``_balanced`` / ``_class<k>`` / ``_labels`` and ``_w<guidance>``, and the grid is ordered by
class (balanced labels: one class per row).

Memory stays flat in ``num_samples``: batches are written into the .npz's array as they
come (one deflated zip member, as ``np.savez_compressed`` writes it) and only the grid's
images are kept. Under ``torchrun`` rank r samples batches r, r + world, ...; each round of
``world`` batches is gathered to rank 0 with one tensor collective and written in order, so
the file is the one a single process writes.
"""
from __future__ import annotations

import math
import time
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np
import torch

from sde import conditioning, configuration, data, distributed, environment, images, randomness, samplers, toy_figures
from sde.checkpoint import atomic_write
from sde.configuration import sampler_options
from sde.generation import generate, sample_generators
from sde.inference import load_ema_model
from sde.quality import GRID_IMAGES
from sde.sdes import create_sde
from sde.workdir import Workdir

TRAJECTORY_ROWS = 4      # samples shown in the reverse-process strip
TRAJECTORY_COLUMNS = 10  # frames per strip, x_T ... x_0


def _trajectory(config, model, sde, device, options, labels: torch.Tensor | None = None) -> np.ndarray:
    """Reverse-process frames of a few samples (the first ones of the run, with their labels)
    above the forward noising of real images."""
    frames: list[torch.Tensor] = []
    states: list[dict[str, Any]] = []

    def keep(state: dict[str, Any]) -> None:
        frames.append(state["x"].detach().float().cpu())
        states.append({"i": state["i"], "t": state["t"]})

    shape = data.sample_shape(config, TRAJECTORY_ROWS)
    generators = sample_generators(config.sampling.seed, 0, TRAJECTORY_ROWS, device)
    x_T = torch.cat([sde.prior_sampling((1,) + shape[1:], generator=g, device=device) for g in generators])
    keep({"i": -1, "t": sde.T, "x": x_T})
    with torch.no_grad():
        first = None if labels is None else labels[torch.arange(TRAJECTORY_ROWS) % len(labels)]
        x, _ = samplers.sample(config.sampling.method, conditioning.bind(model, first, config.sampling.guidance),
                               sde, shape, steps=config.sampling.steps, generator=generators, disable=True,
                               callback=keep, x_T=x_T, **options)
    picks = np.linspace(0, len(frames) - 1, TRAJECTORY_COLUMNS - 1).round().astype(int)
    reverse = [frames[i] for i in picks] + [x.float().cpu()]
    frame_times = [state["t"] for state in states]
    shown_t = [float(frame_times[i]) for i in picks] + [0.0]

    real, _ = data.load_dataset(config, split=data.get_dataset(config.data.dataset).preview_split)
    x0 = data.uint8_to_float(real[:TRAJECTORY_ROWS], dequantize=False)
    noise = randomness.randn(x0.shape, generator=torch.Generator().manual_seed(config.sampling.seed))
    forward = []
    for t in reversed(shown_t):
        t_tensor = torch.tensor([t], dtype=torch.float64)
        forward.append(x0 if t == 0 else (sde.alpha(t_tensor).float() * x0 + sde.sigma(t_tensor).float() * noise))
    rows = [torch.stack([frame[r] for frame in reverse]) for r in range(TRAJECTORY_ROWS)]
    rows += [torch.stack([frame[r] for frame in forward]) for r in range(TRAJECTORY_ROWS)]
    strip = torch.cat(rows)
    return images.image_grid(data.float_to_uint8(strip.clamp(-1, 1), dequantized=False).numpy(),
                             nrow=TRAJECTORY_COLUMNS)


def _stored(config, x: torch.Tensor) -> torch.Tensor:
    """What the .npz holds: float32 points (point data) or uint8 images."""
    x = x.float().cpu()
    if not data.get_dataset(config.data.dataset).is_image:
        return x
    return data.float_to_uint8(x, dequantized=config.data.dequantize)


def _batches_in_order(config, model, sde, context: distributed.Context, options: dict[str, Any],
                      labels: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor, int]]:
    """(first index, stored batch, NFE) of every batch in index order on rank 0; nothing on
    the other ranks, which only take part in the gathers.

    Round k gathers batches k * world + rank (zeros, padded to the batch size, where a rank
    has no batch left) to rank 0: one collective per round, one round held in memory.
    """
    cfg = config.sampling
    produced = generate(config, model, sde, context.device, num_samples=cfg.num_samples,
                        seed=cfg.seed, method=cfg.method, steps=cfg.steps, options=options,
                        shard=context.shard, progress=context.is_main, labels=labels, guidance=cfg.guidance)
    if context.world_size == 1:
        yield from ((first, _stored(config, x), info["nfe"]) for first, x, info in produced)
        return
    num_batches = math.ceil(cfg.num_samples / cfg.batch_size)
    dtype = torch.uint8 if data.get_dataset(config.data.dataset).is_image else torch.float32
    for round_first in range(0, num_batches, context.world_size):
        block = torch.zeros(data.sample_shape(config, cfg.batch_size), dtype=dtype)
        nfe = torch.zeros(1, dtype=torch.int64)
        item = next(produced, None)
        if item is not None:
            first, x, info = item
            stored = _stored(config, x)
            block[:len(stored)], nfe[0] = stored, info["nfe"]
        blocks, nfes = distributed.gather_to_main(block), distributed.gather_to_main(nfe)
        if not context.is_main:
            continue
        for batch_index in range(round_first, min(round_first + context.world_size, num_batches)):
            rank = batch_index - round_first
            first = batch_index * cfg.batch_size
            yield first, blocks[rank][:min(cfg.batch_size, cfg.num_samples - first)], int(nfes[rank])


def write_npz_rows(handle: BinaryIO, key: str, shape: tuple[int, ...], dtype: np.dtype,
                   blocks: Iterable[np.ndarray], extra: dict[str, np.ndarray] | None = None) -> None:
    """An .npz with one array ``key`` of ``shape``, streamed from row blocks in order: the
    .npy header, then each block's bytes into one deflated zip member (``np.load`` reads it
    as a file of ``np.savez_compressed``). The blocks must hold exactly ``shape[0]`` rows.
    ``extra`` arrays (small, e.g. the samples' labels) are written whole beside it."""
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    rows = 0
    with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            for block in blocks:
                block = np.ascontiguousarray(block, dtype=dtype)
                if block.shape[1:] != tuple(shape[1:]):
                    raise ValueError(f"rows of shape {block.shape[1:]} for an array of shape {tuple(shape)}")
                rows += len(block)
                if rows > shape[0]:
                    raise ValueError(f"more than the {shape[0]} rows of {key}")
                member.write(block.tobytes())
        for name, array in (extra or {}).items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array))
    if rows != shape[0]:
        raise ValueError(f"{key} got {rows} of its {shape[0]} rows")


def check(config) -> None:
    """The config of a sampling run: one clear ValueError on the first problem."""
    configuration.validate(config)
    configuration.check_sampling(config)


def run(config, workdir: str | Path) -> dict[str, Any]:
    """``--mode sample``: check the config, then sample (``sample``)."""
    check(config)
    return sample(config, workdir)


def sample(config, workdir: str | Path) -> dict[str, Any]:
    """Run ``--mode sample``; returns the JSON record it writes (rank 0; ``{}`` on other ranks)."""
    context = distributed.setup(config.device, config.tf32)
    run = Workdir(workdir, create=context.is_main)
    sde = create_sde(config)
    model, source, step = load_ema_model(config, workdir, context.device, config.sampling.checkpoint)
    running_on = environment.announce(context.device, processes=context.world_size, model=model,
                                      show=context.is_main)
    cfg = config.sampling
    options = sampler_options(config)
    labels = configuration.sampling_labels(config)
    name = (f"{cfg.method}_{cfg.steps}steps_seed{cfg.seed}{conditioning.describe_labels(labels, cfg.labels)}"
            f"{f'_w{cfg.guidance:g}' if cfg.guidance else ''}")
    points = not data.get_dataset(config.data.dataset).is_image

    start = time.perf_counter()
    batches = _batches_in_order(config, model, sde, context, options, labels)
    if not context.is_main:
        for _ in batches:  # take part in every gather
            pass
        return {}
    grid: list[np.ndarray] = []
    nfe = 0

    def blocks() -> Iterator[np.ndarray]:
        nonlocal nfe
        for first, stored, batch_nfe in batches:
            nfe = batch_nfe  # the last batch's, as a single process reports it
            if not points and first < GRID_IMAGES:
                grid.append(stored[:GRID_IMAGES - first].numpy())
            yield stored.numpy()

    samples_dir = run.samples
    npz_path = samples_dir / f"{name}.npz"
    key, dtype = ("points", np.float32) if points else ("images", np.uint8)
    atomic_write(npz_path, lambda handle: write_npz_rows(
        handle, key, data.sample_shape(config, cfg.num_samples), dtype, blocks(),
        extra=None if labels is None else {"labels": labels.numpy()}))
    wall_time = time.perf_counter() - start

    if points:
        reference, _ = data.load_dataset(config)
        with np.load(npz_path) as saved:
            images.points_png(saved["points"], samples_dir / f"{name}.png", title=name,
                              reference=reference[:2000].numpy())
        toy_figures.flow_figure(config, model, sde, context.device, options, samples_dir / f"{name}_flow.png")
    else:
        images.save_png(images.image_grid(conditioning.by_class(np.concatenate(grid), labels)),
                        samples_dir / f"{name}.png")
        if cfg.save_trajectory:
            images.save_png(_trajectory(config, model, sde, context.device, options, labels),
                            samples_dir / f"{name}_trajectory.png")
    record = {"sampler": cfg.method, "options": options,
              "resolved_options": samplers.reported_options(cfg.method, sde, options), "steps": cfg.steps,
              "nfe_per_sample": nfe, "num_samples": cfg.num_samples, "seed": cfg.seed,
              **({} if labels is None else {"labels": labels.tolist(), "guidance": cfg.guidance}),
              "wall_time_s": wall_time, "processes": context.world_size,
              "checkpoint": source, "checkpoint_step": step, "sde": repr(sde), "environment": running_on,
              "files": {"grid": f"{name}.png", "samples": f"{name}.npz",
                        **({"flow": f"{name}_flow.png"} if points else {})}}
    images.save_json(record, samples_dir / f"{name}.json")
    record["message"] = (f"{cfg.num_samples} samples with {cfg.method} ({nfe} NFE each) in "
                         f"{wall_time:.1f} s -> {samples_dir / (name + '.png')}")
    return record
