"""The network contract every sampler, loss and likelihood shares, and the one call counter.

A noise-prediction network is any callable ``model(x, t) -> eps`` where ``x`` is a batch
[B, ...] and ``t`` a float tensor [B] of times in (0, T]; it returns eps of ``x``'s shape.
The score is -eps / sigma(t) and the denoised estimate (x - sigma(t) eps) / alpha(t).

``CountedModel`` is how the toolkit calls such a network: in the network's own dtype and
on its own device (the callers keep their state in float64, as EDM's sampler does), with
``t`` broadcast to the batch, the output's shape checked and every call counted. One call
evaluates the whole batch, so ``nfe`` is the number of function evaluations per sample,
the cost measure of Song et al. 2021 and Lu et al. 2022. A model that evaluates the
network more than once per sample in one call (classifier-free guidance,
``sde.conditioning``) says so by ``evaluations_per_call``, and is counted that many times.
"""
from __future__ import annotations

from typing import Callable

import torch

Tensor = torch.Tensor
Model = Callable[[Tensor, Tensor], Tensor]


def model_dtype_device(model) -> tuple[torch.dtype | None, torch.device | None]:
    """The dtype and device a network computes in: its first parameter's (a module), the
    wrapped network's (a ``CountedModel``), or (None, None) for a plain callable."""
    if isinstance(model, CountedModel):
        return model.dtype, model.device
    if isinstance(model, torch.nn.Module):
        parameter = next(model.parameters(), None)
        if parameter is not None:
            return parameter.dtype, parameter.device
    return None, None


class CountedModel:
    """``model(x, t) -> eps`` called in its own dtype and device, every call counted.

    Args:
      model: the network (or another ``CountedModel``, whose settings are kept).
      dtype, device: where to call a plain callable, which has no parameters to say so
        (default: the input's).

    Attributes:
      nfe: network calls so far (function evaluations per sample).
      rows: samples evaluated so far, summed over calls (work when batch sizes vary).
    """

    def __init__(self, model: Model, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        own_dtype, own_device = model_dtype_device(model)
        self.model = model
        self.dtype = own_dtype or dtype
        self.device = own_device or (torch.device(device) if device is not None else None)
        self.evaluations_per_call = int(getattr(model, "evaluations_per_call", 1))
        self.nfe = 0
        self.rows = 0

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        """eps at ``(x, t)``, returned in ``x``'s dtype and on ``x``'s device; ``t`` is a
        number, a 0-d tensor or one time per sample."""
        self.nfe += self.evaluations_per_call
        self.rows += x.shape[0] * self.evaluations_per_call
        dtype = self.dtype or (x.dtype if x.is_floating_point() else torch.float32)
        device = self.device or x.device
        t = torch.as_tensor(t, dtype=torch.float64)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        eps = self.model(x.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype))
        if eps.shape != x.shape:
            raise ValueError(f"the model returned shape {tuple(eps.shape)} for an input of shape "
                             f"{tuple(x.shape)}; it must predict eps of the input's shape")
        return eps.to(device=x.device, dtype=x.dtype)
