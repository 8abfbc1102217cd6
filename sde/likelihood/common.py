"""What the likelihood estimators share: argument checks, the counted network, and the
mean and standard error of per-image estimates."""
from __future__ import annotations

import math

import torch
from torch import nn

from sde.network import CountedModel, Model, model_dtype_device
from sde.sdes import SDE

Tensor = torch.Tensor

#: The smallest time of the probability-flow ODE and of the continuous ELBO (score_sde's
#: likelihood eps): its noise is well below the width of a pixel's bin.
DEFAULT_EPS = 1e-5


def counted_network(model: Model, x: Tensor) -> tuple[CountedModel, torch.device]:
    """The network counted and called in its own dtype (a plain callable: ``x``'s floating
    dtype, else float32), and the device the estimate runs on (the network's, else ``x``'s).
    A module must be in eval mode: active dropout would make the likelihood random."""
    if isinstance(model, nn.Module) and model.training:
        raise ValueError("the model is in training mode (dropout active); call model.eval() "
                         "before computing likelihoods")
    dtype, device = model_dtype_device(model)
    dtype = dtype or (x.dtype if x.is_floating_point() else torch.float32)
    device = device or x.device
    return CountedModel(model, dtype=dtype, device=device), device


def check_choice(name: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(map(repr, accepted))}")


def check_eps(sde: SDE, eps: float) -> None:
    if not 0.0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, T) = (0, {sde.T:g}), got {eps}")


def check_images(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim < 2:
        raise ValueError(f"expected uint8 images of shape [N, ...], got {images.dtype} "
                         f"{list(images.shape)}")


def mean_and_standard_error(values: Tensor) -> tuple[float, float, float]:
    """values [images, repeats] -> (mean, standard error, estimator standard error).

    Images are the independent unit: the standard error is the spread of the per-image
    means over sqrt(images) (with one image, the spread over repeats). The estimator
    standard error keeps only the Monte Carlo noise of the estimator (dequantization,
    probes, times): the pooled within-image variance over sqrt(images * repeats).
    """
    images, repeats = values.shape
    mean = values.mean().item()
    per_image = values.mean(1)
    if images > 1:
        standard_error = (per_image.std() / math.sqrt(images)).item()
    elif repeats > 1:
        standard_error = (values.std() / math.sqrt(repeats)).item()
    else:
        standard_error = float("nan")
    estimator = ((values.var(1).mean() / (images * repeats)).sqrt().item()
                 if repeats > 1 else float("nan"))
    return mean, standard_error, estimator
