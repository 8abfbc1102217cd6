"""The noise-prediction MLP for 2-D toy data.

    temb = TimeEmbedding(t)                                 (features -> dense -> SiLU -> dense)
    h_1  = SiLU(dense(x) + dense(SiLU(temb)))
    h_l  = SiLU(dense(h_{l-1}) + dense(SiLU(temb))),   l = 2 .. num_layers
    eps  = dense(h_L)                                    (zero-initialised: eps = 0 at init)

The time embedding is added to every hidden layer (as the U-Net's residual blocks add it to
every block, Ho et al. 2020), so sharp changes of the score with t, which 2-D mixtures have
near t = 0, are within easy reach of every layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sde.data.toy import TOY_DIM
from sde.models.embeddings import LabelEmbedding, TimeEmbedding, batch_times, with_labels

Tensor = torch.Tensor



class ToyMLP(nn.Module):
    """SiLU MLP predicting eps of shape [B, dim] from ``x`` [B, dim] and ``t`` [B] in (0, 1].

    Args:
      dim: data dimension.
      hidden: width of the hidden layers and of the time embedding.
      num_layers: number of hidden layers (>= 1).
      embedding_type: ``"positional"`` or ``"fourier"`` (see ``sde.models.embeddings``).
      fourier_scale: std of the random Fourier frequencies (``"fourier"`` only).
      num_classes: 0 for an unconditional network; otherwise labels 0..num_classes-1 are
        embedded and added to the time embedding (``LabelEmbedding``).
    """

    def __init__(self, dim: int = TOY_DIM, hidden: int = 128, num_layers: int = 3,
                 embedding_type: str = "positional", fourier_scale: float = 16.0, num_classes: int = 0):
        super().__init__()
        if dim < 1 or hidden < 1 or num_layers < 1:
            raise ValueError(f"dim, hidden and num_layers must be >= 1, got {dim}, {hidden}, "
                             f"{num_layers}")
        self.dim = dim
        self.time_embedding = TimeEmbedding(embedding_type, hidden, hidden, fourier_scale)
        self.num_classes = num_classes
        self.label_embedding = LabelEmbedding(num_classes, hidden) if num_classes else None
        widths = [dim] + [hidden] * num_layers
        self.layers = nn.ModuleList(nn.Linear(w_in, w_out) for w_in, w_out in zip(widths, widths[1:]))
        self.time_projs = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_layers))
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """Predict eps. ``x``: [B, dim]; ``t``: [B] (or a scalar for the whole batch); ``y``:
        labels [B] of a conditional network (None: unconditional)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"ToyMLP expects x of shape [B, {self.dim}], got {list(x.shape)}")
        temb = self.time_embedding(batch_times(t, x.shape[0], x.device))
        temb_act = F.silu(with_labels(temb, self.label_embedding, y))
        h = x
        for layer, time_proj in zip(self.layers, self.time_projs):
            h = F.silu(layer(h) + time_proj(temb_act))
        return self.out(h).to(x.dtype)
