"""Noise-prediction networks ``model(x, t) -> eps`` and the factory that builds one from a config.

``MODELS`` maps ``config.model.name`` to a builder reading ``config.model`` and ``config.data``:

* ``"unet"`` (images): ``UNet`` with ``in_channels = data.num_channels``, ``image_size =
  data.image_size`` and model.{nf, ch_mult, num_res_blocks, attn_resolutions, dropout,
  embedding_type, fourier_scale, skip_rescale, channels_last}.
* ``"mlp"`` (``data.dataset = "toy"``): ``ToyMLP`` on 2-D points with ``hidden = model.nf``
  and model.{num_layers, embedding_type, fourier_scale}.
"""
from __future__ import annotations

from typing import Callable

import ml_collections
from torch import nn

from sde.models.embeddings import EMBEDDING_TYPES, TimeEmbedding
from sde.models.mlp import TOY_DIM, ToyMLP
from sde.models.unet import UNet

#: The dataset whose samples are points in R^TOY_DIM rather than images.
TOY_DATASET = "toy"


def _build_unet(config: ml_collections.ConfigDict) -> UNet:
    model, data = config.model, config.data
    if data.dataset == TOY_DATASET:
        raise ValueError("model.name='unet' needs images, but data.dataset='toy' gives 2-D "
                         "points; use model.name='mlp'")
    return UNet(in_channels=data.num_channels, image_size=data.image_size, nf=model.nf,
                ch_mult=tuple(model.ch_mult), num_res_blocks=model.num_res_blocks,
                attn_resolutions=tuple(model.attn_resolutions), dropout=model.dropout,
                embedding_type=model.embedding_type, fourier_scale=model.fourier_scale,
                skip_rescale=model.skip_rescale,
                # run directories written before the key existed: the default layout
                channels_last=model.get("channels_last", True))


def _build_mlp(config: ml_collections.ConfigDict) -> ToyMLP:
    model, data = config.model, config.data
    if data.dataset != TOY_DATASET:
        raise ValueError(f"model.name='mlp' works on 2-D points (data.dataset='toy'), got "
                         f"data.dataset={data.dataset!r}; use model.name='unet' for images")
    return ToyMLP(dim=TOY_DIM, hidden=model.nf, num_layers=model.num_layers,
                  embedding_type=model.embedding_type, fourier_scale=model.fourier_scale)


MODELS: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {
    "unet": _build_unet,
    "mlp": _build_mlp,
}


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
    """Build the network named by ``config.model.name`` (see ``MODELS``)."""
    name = config.model.name
    if name not in MODELS:
        raise ValueError(f"unknown model.name {name!r}; valid: {', '.join(sorted(MODELS))}")
    return MODELS[name](config)


def count_parameters(module: nn.Module) -> int:
    """Number of scalars in ``module.parameters()`` (fixed buffers such as Fourier weights
    are not parameters and are not counted)."""
    return sum(parameter.numel() for parameter in module.parameters())


__all__ = ["MODELS", "EMBEDDING_TYPES", "TimeEmbedding", "ToyMLP", "UNet", "count_parameters",
           "create_model"]
