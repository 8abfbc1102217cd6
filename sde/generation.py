"""Generating samples in batches with per-sample seeds: what sample, eval and compare share.

Image k of a run with seed s is drawn from its own generator (s, k) (EDM's per-seed
generators), so it is the same whatever the batch size or the number of processes.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from sde import conditioning, data, samplers
from sde.progress import bar as progress_bar


def sample_generators(seed: int, first: int, count: int, device: torch.device) -> list[torch.Generator]:
    """One generator per sample: image k of a run with seed s is drawn from generator (s, k).

    Seeds come from numpy's SeedSequence over the words (s, k), so they are well mixed and
    image k is the same whatever the batch size (EDM's per-seed generators).
    """
    generators = []
    for index in range(first, first + count):
        words = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
        generator = torch.Generator(device=device)
        generator.manual_seed(int(words[0]) << 32 | int(words[1]))
        generators.append(generator)
    return generators


def generate(config, model, sde, device: torch.device, *, num_samples: int, seed: int,
             method: str, steps: int, options: dict[str, Any], shard: tuple[int, int] = (0, 1),
             progress: bool = True, labels: torch.Tensor | None = None,
             guidance: float = 0.0) -> Iterator[tuple[int, torch.Tensor, dict[str, Any]]]:
    """Yield (first_index, samples, info) batch by batch, in batches of
    ``config.sampling.batch_size``; image k uses generator (seed, k).

    A class-conditional network draws sample k of class ``labels[k]`` (None: no label, the
    unconditional law), guided with scale ``guidance`` (``sde.conditioning``); an
    unconditional one takes neither.

    With ``shard=(rank, world)`` this process produces only the batches with
    ``batch_index % world == rank``, so the union over ranks is the single-process set.
    """
    batch_size = config.sampling.batch_size
    if labels is not None and len(labels) != num_samples:
        raise ValueError(f"{len(labels)} labels for {num_samples} samples")
    if guidance and labels is None:
        raise ValueError("guidance guides towards a class: give labels (one per sample)")
    conditioning.bind(model, labels, guidance)  # refuses labels or guidance an unconditional model cannot take
    starts = list(range(0, num_samples, batch_size))[shard[0]::shard[1]]
    per_call = 2 if guidance else 1  # a guided call evaluates the network twice per sample (conditioning)
    per_batch = samplers.nfe_for_steps(method, steps, **options)  # None: adaptive, counted as it goes
    per_batch = per_batch and per_batch * per_call
    # The bar counts network evaluations (one per batched call), so that it moves with every
    # sampler step even when all samples are one batch; the images done show beside it.
    bar = progress_bar(desc=f"sampling {sum(min(batch_size, num_samples - s) for s in starts)} images "
                            f"({method}, {steps} steps)", unit="NFE", total=per_batch and per_batch * len(starts),
                       disable=not progress)

    def count_evaluation(*_) -> None:  # a forward hook: returning None keeps the output
        bar.update(per_call)

    counting = (model.register_forward_hook(count_evaluation)
                if isinstance(model, torch.nn.Module) and not bar.disable else None)
    done = 0
    try:
        for first in starts:
            count = min(batch_size, num_samples - first)
            generators = sample_generators(seed, first, count, device)
            with torch.no_grad():
                batch_model = conditioning.bind(model, None if labels is None else labels[first:first + count],
                                                guidance)
                x, info = samplers.sample(method, batch_model, sde, data.sample_shape(config, count),
                                          steps=steps, generator=generators, disable=True, **options)
            done += count
            bar.set_postfix(images=done, refresh=False)
            yield first, x, info
    finally:
        if counting is not None:
            counting.remove()
        bar.close()
