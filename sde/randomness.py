"""The one rule for randomness on any device: a draw happens where its generator lives, and
the result is moved to where it is used.

PyTorch refuses to fill a tensor on one device from a generator on another ("Expected a
'cuda' device type for generator"), so a CPU generator (the per-sample and per-batch seeds
of sampling, evaluation and the data stream are CPU generators, for reproducibility across
machines) cannot draw a CUDA tensor directly. Every draw that takes a generator goes
through this module: it draws on the generator's device (or on ``device`` when there is no
generator, from PyTorch's global generator there) and returns the result on ``device``.
``tests/test_randomness.py`` checks that no other code draws with a generator.

Generator states are CPU byte tensors (``Generator.get_state``, ``torch.get_rng_state``):
``set_state`` takes them from wherever a checkpoint load put them, and
``sde.checkpoint.load_checkpoint`` keeps them on the CPU whatever its ``map_location``.
"""
from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor
Device = torch.device | str | None


def _where(generator: torch.Generator | None, device: Device) -> tuple[torch.device, torch.device]:
    """(the device the draw happens on, the device the result goes to)."""
    target = torch.device(device) if device is not None else (
        generator.device if generator is not None else torch.device("cpu"))
    return (generator.device if generator is not None else target), target


def rand(size: Sequence[int] | int, *, generator: torch.Generator | None = None, device: Device = None,
         dtype: torch.dtype = torch.float32) -> Tensor:
    """U[0, 1) of ``size``, drawn on the generator's device, returned on ``device``."""
    source, target = _where(generator, device)
    return torch.rand(size, generator=generator, device=source, dtype=dtype).to(target)


def randn(size: Sequence[int] | int, *, generator: torch.Generator | None = None, device: Device = None,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """N(0, 1) of ``size``, drawn on the generator's device, returned on ``device``."""
    source, target = _where(generator, device)
    return torch.randn(size, generator=generator, device=source, dtype=dtype).to(target)


def randint(low: int, high: int, size: Sequence[int] | int, *, generator: torch.Generator | None = None,
            device: Device = None, dtype: torch.dtype = torch.int64) -> Tensor:
    """Integers uniform on [low, high) of ``size``, drawn on the generator's device."""
    source, target = _where(generator, device)
    size = (size,) if isinstance(size, int) else tuple(size)
    return torch.randint(low, high, size, generator=generator, device=source, dtype=dtype).to(target)


def randperm(n: int, *, generator: torch.Generator | None = None, device: Device = None) -> Tensor:
    """A random permutation of 0..n-1, drawn on the generator's device."""
    source, target = _where(generator, device)
    return torch.randperm(n, generator=generator, device=source).to(target)


def multinomial(weights: Tensor, num_samples: int, *, replacement: bool = True,
                generator: torch.Generator | None = None, device: Device = None) -> Tensor:
    """Indices drawn with probabilities proportional to ``weights``, on the generator's device."""
    source, target = _where(generator, device if device is not None else weights.device)
    return torch.multinomial(weights.to(source), num_samples, replacement=replacement,
                             generator=generator).to(target)


def get_state(generator: torch.Generator | None = None) -> Tensor:
    """The state of ``generator`` (None: PyTorch's global CPU generator) as a CPU tensor."""
    state = torch.get_rng_state() if generator is None else generator.get_state()
    return state.cpu()


def set_state(state: Tensor, generator: torch.Generator | None = None) -> None:
    """Restore a state of ``get_state``, wherever a checkpoint load put the tensor."""
    if state.device.type == "meta":
        raise ValueError("an RNG state on the 'meta' device has no values; load checkpoints' RNG "
                         "states to the CPU (sde.checkpoint.load_checkpoint does)")
    state = state.to("cpu", torch.uint8)
    if generator is None:
        torch.set_rng_state(state)
    else:
        generator.set_state(state)
