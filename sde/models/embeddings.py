"""Embeddings of the continuous diffusion time ``t`` in (0, 1] for the noise-prediction nets.

Two feature maps, chosen by name (``EMBEDDING_TYPES``):

* ``"positional"``: the sinusoidal embedding of Vaswani et al. 2017 (sec. 3.5) as used for
  the DDPM step index by Ho et al. 2020 (their ``get_timestep_embedding``)::

      omega_k = max_period ** (-k / (d/2 - 1)),   k = 0 .. d/2 - 1
      e(t)    = [sin(s t omega_k), cos(s t omega_k)]                                  (1)

  The frequencies were designed for an argument that is an integer step in [0, 1000):
  the fastest one (omega_0 = 1 rad per step) tells neighbouring steps apart, the slowest
  (1/max_period) varies monotonically over the whole range. A continuous ``t`` in (0, 1]
  would use only a thousandth of that range (the slow half of the features would be
  constant), so ``t`` is scaled by ``s = DDPM_NUM_STEPS``: Ho et al.'s chain length. This
  toolkit's discrete step ``i`` of ``N`` lives at ``t_i = i / N`` (``SDE.discrete_times``),
  so with the DDPM ``N = 1000`` the network sees exactly the integer ``i`` Ho et al. fed
  their network, and a continuously trained model shares the embedding of a discrete one.

* ``"fourier"``: Gaussian random Fourier features (Tancik et al. 2020, eq. 5; the
  ``GaussianFourierProjection`` of NCSN++, Song et al. 2021, appendix H.2)::

      W_k ~ N(0, scale^2) fixed at construction,
      e(t) = [sin(2 pi W t), cos(2 pi W t)]                                           (2)

  ``W`` is a persistent buffer (saved in checkpoints, never trained). With ``t`` in (0, 1]
  and ``scale`` = 16 the frequencies span a few cycles to ~50 cycles over the time range.

``TimeEmbedding`` follows either map with the 2-layer SiLU MLP of Ho et al. 2020
(``dense -> SiLU -> dense``). The features are computed in the dtype of the frequency
buffer (float32 unless the module is cast), never in the autocast dtype: bf16 cannot
resolve ``s t`` ~ 10^3 to better than a few units, which would blur neighbouring steps.
"""
from __future__ import annotations

import math

import torch
from torch import nn

Tensor = torch.Tensor

EMBEDDING_TYPES = ("positional", "fourier")

#: Ho et al. 2020's number of diffusion steps: the range of integer steps the sinusoidal
#: frequencies of eq. (1) were chosen for, and the factor mapping t_i = i/N onto step i.
DDPM_NUM_STEPS = 1000

#: Vaswani et al. 2017's longest period of eq. (1) (slowest frequency 1 / max_period).
SINUSOIDAL_MAX_PERIOD = 10000.0


def _check_feature_dim(dim: int, kind: str, smallest: int) -> None:
    if dim < smallest or dim % 2:
        raise ValueError(f"the {kind} time embedding needs an even dimension >= {smallest} "
                         f"(half sine, half cosine), got {dim}")


class SinusoidalEmbedding(nn.Module):
    """The sinusoidal embedding of eq. (1) of ``t * time_scale`` (Ho et al. 2020, Vaswani et al.
    2017 sec. 3.5)."""

    def __init__(self, dim: int, time_scale: float = DDPM_NUM_STEPS,
                 max_period: float = SINUSOIDAL_MAX_PERIOD):
        super().__init__()
        _check_feature_dim(dim, "positional", smallest=4)  # eq. (1) divides by d/2 - 1
        half = dim // 2
        exponents = torch.arange(half, dtype=torch.float32) / (half - 1)
        frequencies = time_scale * torch.exp(-math.log(max_period) * exponents)
        # Derived from the constructor arguments, so not part of the checkpoint.
        self.register_buffer("frequencies", frequencies, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        angles = t.to(self.frequencies.dtype)[:, None] * self.frequencies[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class GaussianFourierEmbedding(nn.Module):
    """Random Fourier features of eq. (2) (Tancik et al. 2020; NCSN++, Song et al. 2021)."""

    def __init__(self, dim: int, scale: float):
        super().__init__()
        _check_feature_dim(dim, "fourier", smallest=2)
        if not scale > 0:
            raise ValueError(f"fourier_scale must be > 0 (std of the random frequencies), got {scale}")
        self.register_buffer("weight", torch.randn(dim // 2) * scale)

    def forward(self, t: Tensor) -> Tensor:
        angles = (2 * math.pi) * t.to(self.weight.dtype)[:, None] * self.weight[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def time_features(embedding_type: str, dim: int, fourier_scale: float) -> nn.Module:
    """The fixed (untrained) feature map of ``t`` named ``embedding_type``, ``dim`` features."""
    if embedding_type == "positional":
        return SinusoidalEmbedding(dim)
    if embedding_type == "fourier":
        return GaussianFourierEmbedding(dim, fourier_scale)
    raise ValueError(f"unknown embedding_type {embedding_type!r}; valid: {', '.join(EMBEDDING_TYPES)}")


class TimeEmbedding(nn.Module):
    """Fixed features of ``t`` followed by Ho et al. 2020's ``dense -> SiLU -> dense``.

    Args:
      embedding_type: ``"positional"`` (eq. 1) or ``"fourier"`` (eq. 2).
      feature_dim: number of fixed features (even).
      out_dim: width of the learned embedding the network's blocks consume.
      fourier_scale: std of the random frequencies of eq. (2); unused for ``"positional"``.
    """

    def __init__(self, embedding_type: str, feature_dim: int, out_dim: int, fourier_scale: float):
        super().__init__()
        self.features = time_features(embedding_type, feature_dim, fourier_scale)
        self.dense_in = nn.Linear(feature_dim, out_dim)
        self.dense_out = nn.Linear(out_dim, out_dim)

    def forward(self, t: Tensor) -> Tensor:
        """``t`` of shape [B] -> embedding of shape [B, out_dim]."""
        return self.dense_out(nn.functional.silu(self.dense_in(self.features(t))))


def batch_times(t: Tensor | float, batch_size: int, device: torch.device) -> Tensor:
    """The model contract's ``t``: shape [B], or a scalar (0-dim tensor or float) for all B."""
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        return t.expand(batch_size)
    if t.shape != (batch_size,):
        raise ValueError(f"t must have shape [{batch_size}] (one time per sample) or be a "
                         f"scalar, got shape {list(t.shape)}")
    return t


class LabelEmbedding(nn.Module):
    """A learned vector per class label plus one for "no label", added to the time embedding.

    Classifier-free guidance (Ho & Salimans 2022, sec. 3.2) trains one network on both laws:
    with probability ``label_dropout`` a training label is replaced by the null label
    ``num_classes``, so the same weights learn eps(x, t, y) and the unconditional eps(x, t).
    The table is zero-initialised: an untrained conditional network is the unconditional
    one, and every label, the null one included, moves only as training asks it to.

    Args:
      num_classes: number of labels 0..num_classes-1 (the null label is ``num_classes``).
      dim: width of the time embedding the labels are added to.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"a label embedding needs num_classes >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)
        nn.init.zeros_(self.table.weight)

    def forward(self, y: Tensor | None, batch_size: int, device: torch.device) -> Tensor:
        """[B, dim] embeddings of labels ``y`` [B] (None: the null label for the whole batch)."""
        if y is None:
            y = torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)
        return self.table(check_labels(y, self.num_classes, batch_size).to(device))


def check_labels(y: Tensor, num_classes: int, batch_size: int) -> Tensor:
    """``y`` as int64 [B] with entries in 0..num_classes (num_classes: the null label), or a
    ValueError saying what was wrong. The values are checked where that costs no device
    synchronisation (labels on the CPU); callers check user input before it reaches a GPU."""
    y = torch.as_tensor(y)
    if y.shape != (batch_size,) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"labels must be integers of shape [{batch_size}] (one per sample), got "
                         f"{y.dtype} of shape {list(y.shape)}")
    if batch_size and y.device.type == "cpu" and (int(y.min()) < 0 or int(y.max()) > num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1} ({num_classes}: no label), got values "
                         f"{int(y.min())}..{int(y.max())}")
    return y.long()


def with_labels(temb: Tensor, labels: LabelEmbedding | None, y: Tensor | None) -> Tensor:
    """The time embedding ``temb`` [B, dim] plus the label embedding of ``y`` (a conditional
    network), or ``temb`` itself (an unconditional one, which takes no labels)."""
    if labels is None:
        if y is not None:
            raise ValueError("this network is unconditional (model.num_classes = 0): it takes no class labels")
        return temb
    return temb + labels(y, temb.shape[0], temb.device).to(temb.dtype)
