"""Noise-prediction networks ``model(x, t) -> eps`` and the factory that builds one from a config.

``MODELS`` maps ``config.model.name`` to a ``ModelSpec``: a builder reading ``config.model`` and
``config.data``, the kind of data the network takes and the checks of its keys:

* ``"unet"`` (images): ``UNet`` with ``in_channels = data.num_channels``, ``image_size =
  data.image_size`` and model.{nf, ch_mult, num_res_blocks, attn_resolutions, dropout,
  embedding_type, fourier_scale, skip_rescale, channels_last}.
* ``"mlp"`` (point data, ``data.dataset = "toy"``): ``ToyMLP`` on the points with ``hidden = model.nf``
  and model.{num_layers, embedding_type, fourier_scale}.
* ``"exact"`` (toy sets with a closed form, ``data.CLOSED_FORM_NAMES``): ``ExactMixtureEps``, the
  true noise predictor of the data under the configured SDE; nothing to train or load.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import ml_collections
from torch import nn

from sde.config_rules import check_values
from sde.data import CLOSED_FORM_NAMES, get_dataset, toy_mixture
from sde.models.embeddings import EMBEDDING_TYPES, TimeEmbedding
from sde.models.exact import ExactMixtureEps
from sde.models.mlp import ToyMLP
from sde.models.unet import UNet


@dataclass(frozen=True)
class ModelSpec:
    """A network family: ``build(config)``, the kind of data it takes (``sde.data.KINDS``) and
    ``check(config)``, the checks of its ``config.model`` keys."""

    build: Callable[[ml_collections.ConfigDict], nn.Module]
    kind: str
    check: Callable[[ml_collections.ConfigDict], None] = lambda config: None


def _build_unet(config: ml_collections.ConfigDict) -> UNet:
    model, data = config.model, config.data
    return UNet(in_channels=data.num_channels, image_size=data.image_size, nf=model.nf,
                ch_mult=tuple(model.ch_mult), num_res_blocks=model.num_res_blocks,
                attn_resolutions=tuple(model.attn_resolutions), dropout=model.dropout,
                embedding_type=model.embedding_type, fourier_scale=model.fourier_scale,
                skip_rescale=model.skip_rescale,
                # run directories written before the key existed: the default layout
                channels_last=model.get("channels_last", True), num_classes=model.get("num_classes", 0))


def _build_mlp(config: ml_collections.ConfigDict) -> ToyMLP:
    model = config.model
    (dim,) = get_dataset(config.data.dataset).example_shape(config.data)
    return ToyMLP(dim=dim, hidden=model.nf, num_layers=model.num_layers,
                  embedding_type=model.embedding_type, fourier_scale=model.fourier_scale,
                  num_classes=model.get("num_classes", 0))


def _build_exact(config: ml_collections.ConfigDict) -> ExactMixtureEps:
    from sde.sdes import create_sde  # the model is the SDE's marginal score

    return ExactMixtureEps(create_sde(config), toy_mixture(config.data.toy_name),
                           num_classes=config.model.get("num_classes", 0))


def _check_exact(config: ml_collections.ConfigDict) -> None:
    if config.data.toy_name not in CLOSED_FORM_NAMES:
        raise ValueError(f"model.name='exact' needs a toy set with a closed-form density "
                         f"({', '.join(CLOSED_FORM_NAMES)}), got data.toy_name={config.data.toy_name!r}")
    components = len(toy_mixture(config.data.toy_name).weights)
    if config.model.get("num_classes", 0) not in (0, components):
        raise ValueError(f"the exact model's classes are the {components} components of "
                         f"{config.data.toy_name!r}: model.num_classes must be 0 or {components}, "
                         f"got {config.model.num_classes}")


def _check_classes(config: ml_collections.ConfigDict) -> None:
    """A conditional network takes the data set's labels: model.num_classes is 0 or their count."""
    classes = config.model.get("num_classes", 0)
    if not classes or is_exact(config):
        return
    dataset = get_dataset(config.data.dataset)
    if not dataset.num_classes:
        raise ValueError(f"model.num_classes={classes} needs labelled data; data.dataset={dataset.name!r} has "
                         f"no labels (the exact toy model takes model.num_classes = its components)")
    if classes != dataset.num_classes:
        raise ValueError(f"model.num_classes must be 0 (unconditional) or {dataset.num_classes} (the labels of "
                         f"{dataset.name}), got {classes}")


MODELS: dict[str, ModelSpec] = {
    "unet": ModelSpec(_build_unet, kind="image"),
    "mlp": ModelSpec(_build_mlp, kind="points"),
    "exact": ModelSpec(_build_exact, kind="points", check=_check_exact),
}


def is_exact(config: ml_collections.ConfigDict) -> bool:
    """Whether the configured model is a closed form (no weights to train or load)."""
    return config.model.name == "exact"


def check_model_config(config: ml_collections.ConfigDict) -> None:
    """``config.model`` against its network family and the data set: one clear ValueError."""
    name = config.model.name
    if name not in MODELS:
        raise ValueError(f"unknown model.name {name!r}; accepted: {', '.join(MODELS)}")
    dataset = get_dataset(config.data.dataset)
    if MODELS[name].kind != dataset.kind:
        fitting = [other for other, spec in MODELS.items() if spec.kind == dataset.kind]
        raise ValueError(f"data.dataset={dataset.name!r} ({dataset.kind} data) needs model.name="
                         f"{' or '.join(map(repr, fitting))}, got {name!r}")
    MODELS[name].check(config)
    _check_classes(config)
    check_values(config, "model")  # the numeric keys' rules, for callers that skip configuration.validate


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
    """Build the network named by ``config.model.name`` (see ``MODELS``) for the configured data."""
    check_model_config(config)
    return MODELS[config.model.name].build(config)


def count_parameters(module: nn.Module) -> int:
    """Number of scalars in ``module.parameters()`` (fixed buffers such as Fourier weights
    are not parameters and are not counted)."""
    return sum(parameter.numel() for parameter in module.parameters())


__all__ = ["EMBEDDING_TYPES", "ExactMixtureEps", "MODELS", "ModelSpec", "TimeEmbedding", "ToyMLP", "UNet",
           "check_model_config", "count_parameters", "create_model", "is_exact"]
