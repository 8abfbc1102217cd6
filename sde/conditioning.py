"""Class labels and classifier-free guidance, behind the label-free model contract.

A conditional network is called ``network(x, t, y)`` with labels ``y`` in 0..K-1, and
``y = K`` (or None) for "no label": label dropout trains both laws in one network (Ho &
Salimans 2022, Algorithm 1). The samplers, likelihoods and losses know only ``model(x, t)``
(``sde.network``); ``Conditioned`` binds a batch's labels to the network and is such a model,
so every sampler and likelihood runs conditioned without knowing it.

Classifier-free guidance with scale w (Ho & Salimans 2022, eq. 6) replaces the noise
prediction by

    eps_w(x, t, y) = (1 + w) eps(x, t, y) - w eps(x, t, null),                        (6)

i.e. the score of p_t(x | y) p_t(y | x)^w, up to the network's errors: w = 0 is the
conditional model, w > 0 sharpens towards what the implicit classifier p(y | x) recognises
as class y, at the cost of diversity. Both terms come from one batched call of the network
on [x; x] with labels [y; null], so a guided step is two network evaluations per sample:
``evaluations_per_call = 2`` makes ``CountedModel`` count them both in ``info["nfe"]``.
"""
from __future__ import annotations

import hashlib
import math
import numbers
from typing import Sequence

import numpy as np
import torch
from torch import nn

Tensor = torch.Tensor

#: What ``sampling.labels`` accepts besides class numbers: one of each class in turn.
BALANCED = "balanced"


def num_classes(model) -> int:
    """The number of class labels a network takes (0: unconditional)."""
    return int(getattr(model, "num_classes", 0) or 0)


class Conditioned(nn.Module):
    """``model(x, t) -> eps`` of a conditional ``network`` for fixed labels, guided by ``guidance``.

    Args:
      network: a conditional network ``network(x, t, y)`` with ``network.num_classes`` = K.
      labels: int64 [B], one label per sample of the batches this model will be called on;
        K (``network.num_classes``) means "no label". None: every sample unlabelled.
      guidance: w of eq. (6); 0 evaluates the network once per call.
    """

    def __init__(self, network: nn.Module, labels: Tensor | None, guidance: float = 0.0):
        super().__init__()
        classes = num_classes(network)
        if not classes:
            raise ValueError("the network is unconditional (model.num_classes = 0): it takes no labels "
                             "and no guidance")
        guidance = check_guidance(guidance)
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
                raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} of shape "
                                 f"{list(labels.shape)}")
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) > classes):
                raise ValueError(f"labels must be in 0..{classes - 1} ({classes}: no label), got "
                                 f"{int(labels.min())}..{int(labels.max())}")
            labels = labels.long()
        self.network, self.labels, self.guidance = network, labels, float(guidance)
        self.num_classes = classes
        self.train(network.training)  # a wrapper of an eval-mode network is in eval mode too

    @property
    def evaluations_per_call(self) -> int:
        """Network evaluations per sample in one call: 2 when guided (eq. 6), else 1."""
        return 2 if self.guidance else 1

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        batch = x.shape[0]
        null = torch.full((batch,), self.num_classes, dtype=torch.long, device=x.device)
        if self.labels is None:
            y = null
        else:
            if len(self.labels) != batch:
                raise ValueError(f"{len(self.labels)} labels for a batch of {batch} samples")
            if self.labels.device != x.device:  # moved once, not at every step
                self.labels = self.labels.to(x.device)
            y = self.labels
        if not self.guidance:
            return self.network(x, t, y)
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(batch) if t.ndim == 0 else t
        both = self.network(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        conditional, unconditional = both[:batch], both[batch:]
        return (1 + self.guidance) * conditional - self.guidance * unconditional


def check_guidance(guidance) -> float:
    """w of eq. (6) as a float: a finite real number >= 0 (w = 0: the conditional model, unguided)."""
    if isinstance(guidance, Tensor) and guidance.ndim == 0 and not guidance.dtype == torch.bool:
        guidance = guidance.item()
    if isinstance(guidance, (bool, np.bool_)) or not isinstance(guidance, numbers.Real) \
            or not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance must be a finite number >= 0 (0: conditional, unguided), got {guidance!r}")
    return float(guidance)


def _whole(value) -> int | None:
    """``value`` as a class number, or None when it is not a whole number (bools are not)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def resolve_labels(labels, count: int, classes: int, *, trained: Sequence[int] = (),
                   name: str = "sampling.labels") -> Tensor | None:
    """The labels of ``count`` samples from what a user asks for.

    ``labels``: None or "" (no label: the unconditional law), ``"balanced"`` (sample k gets
    class k mod K, so every K consecutive samples hold each class once), one class (an int,
    or its digits as a string) for every sample, or a sequence (a list, tuple, 1-D array or
    tensor, or a comma-separated string) of exactly ``count`` classes. ``trained``: the classes
    the model was trained on when only some were (``data.classes``); "balanced" then cycles
    over them and other classes are refused. Anything else is a ValueError naming ``name``
    and what it accepts.
    """
    allowed = sorted(trained) if len(trained) else list(range(classes))
    shown = ", ".join(map(str, allowed)) if len(trained) else f"0..{classes - 1}"
    accepted = (f"accepted: '' (no label), '{BALANCED}', one class in {shown}, or a list of "
                f"{count} classes (one per sample)")
    if labels is None or (isinstance(labels, str) and labels.strip() == ""):
        return None
    if not classes:
        raise ValueError(f"{name}={labels!r} needs a class-conditional model (model.num_classes > 0); "
                         f"this one is unconditional")
    if isinstance(labels, str):
        text = labels.strip()
        if text == BALANCED:
            return torch.tensor(allowed, dtype=torch.long)[torch.arange(count) % len(allowed)]
        parts = [part.strip() for part in text.strip("()[]").split(",")]
        if not parts or not all(part.isascii() and part.isdigit() for part in parts):
            raise ValueError(f"{name}={labels!r} is not understood; {accepted}")
        values: list = [int(part) for part in parts]
        labels = values[0] if len(values) == 1 and "," not in text else values
    if isinstance(labels, (Tensor, np.ndarray)) and labels.ndim == 0:
        labels = labels.item()
    if _whole(labels) is not None:
        values = [_whole(labels)] * count
    elif isinstance(labels, (list, tuple)) or (isinstance(labels, (Tensor, np.ndarray)) and labels.ndim == 1):
        values = [_whole(value) for value in (labels.tolist() if isinstance(labels, (Tensor, np.ndarray))
                                              else labels)]
        if any(value is None for value in values):
            raise ValueError(f"{name} must hold whole numbers (class numbers); {accepted}")
        if len(values) != count:
            raise ValueError(f"{name} has {len(values)} labels for {count} samples; {accepted}")
    else:
        raise ValueError(f"{name}={labels!r} is not understood; {accepted}")
    bad = sorted(set(values) - set(allowed))
    if bad:
        raise ValueError(f"{name} has classes {bad[:10]} outside {shown}; {accepted}")
    return torch.tensor(values, dtype=torch.long)


def labelled(network, labels: Tensor | None):
    """The training view of a network: ``model(x, t)`` that passes the batch's ``labels``
    (None: the network itself, unconditional). The losses stay label-agnostic."""
    if labels is None:
        return network
    return lambda x, t: network(x, t, labels)


def bind(network, labels: Tensor | None, guidance: float = 0.0):
    """``network`` as a label-free model: itself when unconditional and nothing is asked of
    it, else ``Conditioned(network, labels, guidance)``."""
    if not num_classes(network):
        if labels is not None or guidance:
            raise ValueError("labels and guidance need a class-conditional model (model.num_classes > 0); "
                             "this one is unconditional")
        return network
    return Conditioned(network, labels, guidance)


def describe_labels(labels: Tensor | None, spec) -> str:
    """A short tag for file names: "" (no label), "_balanced", "_class7", or "_labels" and 8
    hex digits of the list's digest (two different lists never share a file)."""
    if labels is None:
        return ""
    if isinstance(spec, str) and spec.strip() == BALANCED:
        return f"_{BALANCED}"
    if len(labels) and bool((labels == labels[0]).all()):
        return f"_class{int(labels[0])}"
    return f"_labels{hashlib.sha256(labels.numpy().astype('<i8').tobytes()).hexdigest()[:8]}"


def by_class(images, labels: Tensor | None):
    """``images`` (a numpy array or tensor [N, ...]) in a stable order of their labels, so a
    grid of a balanced set shows one class per row."""
    if labels is None:
        return images
    order = torch.sort(torch.as_tensor(labels)[:len(images)], stable=True).indices.numpy()
    return images[order]
