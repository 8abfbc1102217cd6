"""Scaling (the map from 8-bit pixels ``u`` in {0..255} to the model's ``x``):

    plain:        x = u / 255 * 2 - 1                    x in [-1, 1], both ends reached
    dequantized:  x = (u + v) / 256 * 2 - 1,  v ~ U[0, 1)   x in [-1, 1), continuous

The dequantized map (Theis et al. 2016, "A note on the evaluation of generative models",
Sec. 3.1; Ho et al. 2020 / Song et al. 2021 use it for bits/dim) sends each pixel value
to its own bin of width 2 / NUM_PIXEL_LEVELS. With y = u + v in [0, 256)^D the change of
variables x = y * (2 / 256) - 1 gives ``log p_y(y) = log p_x(x) + D log(2 / 256)``, so
``bits/dim = -log2 p_x(x) / D + log2(NUM_PIXEL_LEVELS / 2)`` (= +7 bits for 8-bit data).
``float_to_uint8`` inverts either map exactly (round trip is the identity on uint8).
"""
from __future__ import annotations

import torch

from sde import randomness

Tensor = torch.Tensor

#: 8-bit pixels: u in {0, ..., NUM_PIXEL_LEVELS - 1}.
NUM_PIXEL_LEVELS = 2 ** 8
MAX_PIXEL_VALUE = NUM_PIXEL_LEVELS - 1


def uint8_to_float(images: Tensor, *, dequantize: bool, generator: torch.Generator | None = None) -> Tensor:
    """Map uint8 pixels ``u`` to float32 ``x``: ``u/255*2-1`` or, dequantized, ``(u+v)/256*2-1``.

    Dequantization (Theis et al. 2016, Sec. 3.1) adds ``v ~ U[0, 1)`` drawn from
    ``generator``, giving continuous data in [-1, 1) on which bits/dim is well defined.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"uint8_to_float expects torch.uint8 pixels, got {images.dtype}")
    pixels = images.to(torch.float32)
    if not dequantize:
        return pixels / MAX_PIXEL_VALUE * 2 - 1
    noise = randomness.rand(images.shape, generator=generator, dtype=torch.float32, device=images.device)
    return (pixels + noise) / NUM_PIXEL_LEVELS * 2 - 1


def training_view(batch: Tensor, *, random_flip: bool, dequantize: bool,
                  generator: torch.Generator) -> Tensor:
    """A batch as training sees it: uint8 images flipped left-right with probability 1/2
    (``random_flip``) and scaled by ``uint8_to_float``; points (toy data) unchanged."""
    if batch.dtype != torch.uint8:
        return batch
    if random_flip:
        flip = randomness.rand(len(batch), generator=generator, device=batch.device) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    return uint8_to_float(batch, dequantize=dequantize, generator=generator)


def float_to_uint8(x: Tensor, *, dequantized: bool) -> Tensor:
    """Inverse of ``uint8_to_float`` (for saving samples): float in [-1, 1] -> uint8.

    Plain data: ``u = round((x + 1) / 2 * 255)``. Dequantized data: ``u`` is the bin that
    contains ``x``, ``floor((x + 1) / 2 * 256)``. Values outside [-1, 1] are clipped.
    """
    unit = (x.detach().to(torch.float32).clamp(-1, 1) + 1) / 2
    if dequantized:
        pixels = torch.floor(unit * NUM_PIXEL_LEVELS)
    else:
        pixels = torch.round(unit * MAX_PIXEL_VALUE)
    return pixels.clamp(0, MAX_PIXEL_VALUE).to(torch.uint8)
