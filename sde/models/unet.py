"""The noise-prediction U-Net for images: DDPM (Ho et al. 2020, appendix B) with the DDPM++
changes of Song et al. 2021 (appendix H.1): residual outputs rescaled by 1/sqrt(2), and a
continuous time ``t`` embedded by sinusoidal or Gaussian Fourier features.

Layout, for ``ch_mult = (m_0, .., m_{L-1})`` and resolutions ``r_i = image_size / 2^i``::

    conv3x3(in_channels -> nf)
    down, level i:  num_res_blocks x [ResBlock -> nf m_i, attention if r_i in attn_resolutions],
                    then a stride-2 conv3x3 unless i = L-1
    middle:         ResBlock, attention, ResBlock           (at r_{L-1}, always, as DDPM)
    up, level i:    (num_res_blocks + 1) x [concat the matching down activation,
                    ResBlock -> nf m_i, attention if r_i in attn_resolutions],
                    then nearest x2 + conv3x3 unless i = 0
    GroupNorm -> SiLU -> conv3x3(nf -> in_channels), zero-initialised

Residual block (Ho et al. 2020; the ``ResnetBlockDDPMpp`` of Song et al. 2021)::

    h   = conv3x3(SiLU(GroupNorm(x))) + dense(SiLU(temb))
    h   = conv3x3(Dropout(SiLU(GroupNorm(h))))                        (zero-initialised)
    out = (shortcut(x) + h) * c,   shortcut = 1x1 conv if channels change, else identity

with ``c = 1/sqrt(2)`` when ``skip_rescale`` (``RESIDUAL_SCALE``): two independent branches of
unit variance sum to variance 2, so the rescale keeps every block's output at the variance
of its input instead of letting it grow with depth. The up-path blocks take the U-Net skip
concatenation as their input, so that path is rescaled the same way, and so is every
attention block's ``x + attention(x)``.

Initialisation is Ho et al.'s: ``variance_scaling(1, fan_avg, uniform)`` (Glorot uniform)
weights, zero biases, and zero for the last conv of every residual branch and attention
output, so each block starts as (a rescaled) identity, and for the final conv, so the
untrained network predicts eps = 0. A zero layer passes no gradient to the layers before
it, so at step 0 only the final conv learns; each later step unlocks one more layer of
the chain (the tests check that every parameter receives gradient once the zeros move).

Memory layout: the conv weights and activations are channels-last (NHWC) by default. The
numbers are the same (the layout only reorders memory), and oneDNN's CPU convolutions and
cuDNN's mixed-precision ones are faster on it (``bench/train_throughput.py`` times training
and sampling-time evaluation in both layouts). ``channels_last=False`` keeps
PyTorch's default NCHW layout.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sde.models.embeddings import LabelEmbedding, TimeEmbedding, batch_times, with_labels

Tensor = torch.Tensor

#: Output scale of a residual sum when skip_rescale (see the module docstring).
RESIDUAL_SCALE = 1.0 / math.sqrt(2.0)

#: Ho et al. 2020 use 32 GroupNorm groups (Wu & He 2018's default); narrow layers use fewer
#: groups so that each group still normalises at least this many channels.
MAX_NORM_GROUPS = 32
MIN_CHANNELS_PER_GROUP = 4

#: Width of the learned time embedding, as a multiple of nf (Ho et al. 2020: 4 nf).
TIME_EMBEDDING_MULT = 4

#: Ho et al. 2020 and DDPM++ use single-head self-attention.
ATTENTION_HEADS = 1


def norm_groups(channels: int) -> int:
    """GroupNorm group count for ``channels``: the largest divisor of ``channels`` that is at
    most ``min(32, channels // 4)`` (so 32 -> 8, 64 -> 16, 96 -> 24, >= 128 and a multiple of
    32 -> 32, 200 -> 25); 1 for fewer than 8 channels."""
    most = max(1, min(MAX_NORM_GROUPS, channels // MIN_CHANNELS_PER_GROUP))
    return max(g for g in range(1, most + 1) if channels % g == 0)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, returned in the input's dtype.

    The statistics of a bf16/fp16 activation are better taken in float32 (guided-diffusion's
    ``GroupNorm32`` does the same for fp16), and on CPU it is also far faster: PyTorch's
    channels-last GroupNorm kernel is much slower in bf16 than in float32, slow enough to make
    bf16 autocast training of this U-Net slower than float32. A float64 network (the
    likelihood benchmark's reference) normalizes in float64.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x.to(dtype), self.num_groups, weight, bias, self.eps).to(x.dtype)


def group_norm(channels: int) -> nn.GroupNorm:
    return GroupNorm32(norm_groups(channels), channels)


#: Random bits per element of the CPU dropout mask (``Dropout``): drop rates are realised as
#: multiples of 2^-15, e.g. 0.1 as 3277 / 32768 = 0.100006.
DROPOUT_MASK_BITS = 15


class Dropout(nn.Dropout):
    """Inverted dropout (Srivastava et al. 2014) with a cheaper CPU mask than PyTorch's.

    On CPU ``F.dropout`` draws every element through ``bernoulli_``, one Mersenne-Twister
    draw and a float comparison per element, a visible share of this U-Net's CPU training
    step (BENCHMARKS.md, training throughput). Here one 64-bit draw gives the
    mask of four elements: the low ``DROPOUT_MASK_BITS`` bits of each 16-bit quarter are
    uniform on [0, 2^15) and an element is dropped when they fall below round(p 2^15). Kept
    elements are scaled by 1 / (1 - p') for the realised rate p', so E[output] = input exactly
    (the scale is applied in a second multiplication, in the input's precision: folding it
    into a bf16 mask would round 1 / 0.9 to 1.109 and bias the output by about -0.2 %). In eval
    mode, at p = 0, and on other devices (CUDA's dropout is a fused Philox kernel) this is
    ``nn.Dropout``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        levels = 2 ** DROPOUT_MASK_BITS
        threshold = round(self.p * levels)
        if threshold == levels:
            return torch.zeros_like(x)
        words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_()
        bits = words.view(torch.int16)[: x.numel()] & (levels - 1)  # words are in [0, 2^63)
        keep = (bits >= threshold).to(x.dtype)
        dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
        # A dense x's strides index a permutation of numel elements: the mask takes its layout.
        keep = keep.as_strided(x.shape, x.stride()) if dense else keep.view(x.shape)
        return (x * keep).mul_(levels / (levels - threshold))


def _initialise(layer: nn.Conv2d | nn.Linear, zero: bool = False) -> nn.Conv2d | nn.Linear:
    """Ho et al.'s init: Glorot-uniform weights (or zeros), zero bias."""
    if zero:
        nn.init.zeros_(layer.weight)
    else:
        nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, zero: bool = False) -> nn.Conv2d:
    return _initialise(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1), zero)


def conv1x1(in_channels: int, out_channels: int, zero: bool = False) -> nn.Conv2d:
    return _initialise(nn.Conv2d(in_channels, out_channels, 1), zero)


class ResBlock(nn.Module):
    """Residual block of Ho et al. 2020 / DDPM++ (module docstring). ``forward`` takes the
    already activated time embedding ``SiLU(temb)``, computed once per network call."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, dropout: float,
                 skip_rescale: bool):
        super().__init__()
        self.norm_in = group_norm(in_channels)
        self.conv_in = conv3x3(in_channels, out_channels)
        self.time_proj = _initialise(nn.Linear(time_dim, out_channels))
        self.norm_out = group_norm(out_channels)
        self.dropout = Dropout(dropout)
        self.conv_out = conv3x3(out_channels, out_channels, zero=True)
        self.shortcut = (conv1x1(in_channels, out_channels) if in_channels != out_channels
                         else nn.Identity())
        self.output_scale = RESIDUAL_SCALE if skip_rescale else 1.0

    def forward(self, x: Tensor, temb_act: Tensor) -> Tensor:
        h = self.conv_in(F.silu(self.norm_in(x)))
        h = h + self.time_proj(temb_act)[:, :, None, None]
        h = self.conv_out(self.dropout(F.silu(self.norm_out(h))))
        return (self.shortcut(x) + h) * self.output_scale


def attention(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """``softmax(q k^T / sqrt(d)) v`` over the last two dims (Vaswani et al. 2017 eq. 1).

    PyTorch's fused ``scaled_dot_product_attention``, except when gradients flow on CPU: there
    its flash-attention backward is slower than the explicit product, by far in bf16 at this
    U-Net's 7x7 attention. The explicit form holds the [HW, HW] weights, which
    at the resolutions a CPU trains is small (7x7: 49^2 per image and head).
    """
    if query.device.type == "cpu" and torch.is_grad_enabled() and query.requires_grad:
        weights = torch.softmax((query * query.shape[-1] ** -0.5) @ key.transpose(-1, -2), dim=-1)
        return weights @ value
    return F.scaled_dot_product_attention(query, key, value)


class AttentionBlock(nn.Module):
    """Self-attention over the pixels (Ho et al. 2020; Vaswani et al. 2017 eq. 1):
    ``x + proj(softmax(q k^T / sqrt(d)) v)`` with q, k, v 1x1 convs of GroupNorm(x)."""

    def __init__(self, channels: int, skip_rescale: bool, num_heads: int = ATTENTION_HEADS):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels ({channels}) must be divisible by the number "
                             f"of heads ({num_heads})")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = conv1x1(channels, 3 * channels)
        self.proj_out = conv1x1(channels, channels, zero=True)
        self.output_scale = RESIDUAL_SCALE if skip_rescale else 1.0

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, 3, self.num_heads, channels // self.num_heads,
                                             height * width)
        query, key, value = qkv.transpose(-1, -2).unbind(1)  # each [B, heads, HW, d]
        h = attention(query, key, value)
        h = h.transpose(-1, -2).reshape(batch, channels, height, width)
        return (x + self.proj_out(h)) * self.output_scale


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 conv3x3 (Ho et al. 2020)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then conv3x3 (Ho et al. 2020)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNetLevel(nn.Module):
    """One resolution of the U-Net: residual blocks, each followed by attention (or identity),
    then an optional resampling layer."""

    def __init__(self, blocks: list[ResBlock], attentions: list[nn.Module],
                 resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attentions = nn.ModuleList(attentions)
        self.resample = resample


class UNet(nn.Module):
    """DDPM++-style U-Net predicting the noise eps of ``x`` at time ``t`` (module docstring).

    Args:
      in_channels: image channels (1 for MNIST, 3 for CIFAR-10); the output has as many.
      image_size: height = width of the images; must be divisible by 2^(len(ch_mult) - 1).
      nf: base width; level i has ``nf * ch_mult[i]`` channels.
      ch_mult: width multiplier per resolution level.
      num_res_blocks: residual blocks per level on the down path (one more on the up path).
      attn_resolutions: resolutions (of ``image_size / 2^i``) that get self-attention.
      dropout: dropout rate inside the residual blocks.
      embedding_type: ``"positional"`` or ``"fourier"`` (see ``sde.models.embeddings``).
      fourier_scale: std of the random Fourier frequencies (``"fourier"`` only).
      skip_rescale: scale each residual sum by 1/sqrt(2) (DDPM++).
      channels_last: keep conv weights and activations in the NHWC layout (module docstring).
      num_classes: 0 for an unconditional network; otherwise class labels 0..num_classes-1
        are embedded and added to the time embedding (``LabelEmbedding``; Ho & Salimans 2022).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, nf: int = 32,
                 ch_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1,
                 attn_resolutions: Sequence[int] = (7,), dropout: float = 0.1,
                 embedding_type: str = "positional", fourier_scale: float = 16.0,
                 skip_rescale: bool = True, channels_last: bool = True, num_classes: int = 0):
        super().__init__()
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        resolutions = _check_arguments(in_channels, image_size, nf, ch_mult, num_res_blocks,
                                       attn_resolutions, dropout)
        self.in_channels, self.image_size = in_channels, image_size
        time_dim = TIME_EMBEDDING_MULT * nf
        self.time_embedding = TimeEmbedding(embedding_type, nf, time_dim, fourier_scale)
        self.num_classes = num_classes
        self.label_embedding = LabelEmbedding(num_classes, time_dim) if num_classes else None
        self.conv_in = conv3x3(in_channels, nf)

        def res_block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, time_dim, dropout, skip_rescale)

        def attention_or_identity(channels: int, resolution: int) -> nn.Module:
            if resolution in attn_resolutions:
                return AttentionBlock(channels, skip_rescale)
            return nn.Identity()

        channels, skip_channels = nf, [nf]
        down_levels = []
        for level, (mult, resolution) in enumerate(zip(ch_mult, resolutions)):
            blocks, attentions = [], []
            for _ in range(num_res_blocks):
                blocks.append(res_block(channels, nf * mult))
                channels = nf * mult
                attentions.append(attention_or_identity(channels, resolution))
                skip_channels.append(channels)
            downsample = None
            if level < len(ch_mult) - 1:
                downsample = Downsample(channels)
                skip_channels.append(channels)
            down_levels.append(UNetLevel(blocks, attentions, downsample))
        self.down_levels = nn.ModuleList(down_levels)

        self.mid_block_in = res_block(channels, channels)
        self.mid_attention = AttentionBlock(channels, skip_rescale)
        self.mid_block_out = res_block(channels, channels)

        up_levels = []
        for level in reversed(range(len(ch_mult))):
            blocks, attentions = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(res_block(channels + skip_channels.pop(), nf * ch_mult[level]))
                channels = nf * ch_mult[level]
                attentions.append(attention_or_identity(channels, resolutions[level]))
            up_levels.append(UNetLevel(blocks, attentions, Upsample(channels) if level else None))
        self.up_levels = nn.ModuleList(up_levels)

        self.norm_out = group_norm(channels)
        self.conv_out = conv3x3(channels, in_channels, zero=True)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """Predict eps. ``x``: [B, in_channels, image_size, image_size]; ``t``: [B] (or a
        scalar for the whole batch) in (0, 1]; ``y``: class labels [B] of a conditional
        network (None or ``num_classes``: unconditional). Returns eps with the shape and
        dtype of ``x``."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"UNet expects x of shape [B, {', '.join(map(str, expected))}], "
                             f"got {list(x.shape)}")
        temb = self.time_embedding(batch_times(t, x.shape[0], x.device))
        temb_act = F.silu(with_labels(temb, self.label_embedding, y))

        h = self.conv_in(x.contiguous(memory_format=self.memory_format))
        skips = [h]
        for level in self.down_levels:
            for block, attention in zip(level.blocks, level.attentions):
                h = attention(block(h, temb_act))
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)

        h = self.mid_block_in(h, temb_act)
        h = self.mid_attention(h)
        h = self.mid_block_out(h, temb_act)

        for level in self.up_levels:
            for block, attention in zip(level.blocks, level.attentions):
                h = attention(block(torch.cat([h, skips.pop()], dim=1), temb_act))
            if level.resample is not None:
                h = level.resample(h)

        eps = self.conv_out(F.silu(self.norm_out(h)))
        return eps.to(dtype=x.dtype, memory_format=torch.contiguous_format)


def _check_arguments(in_channels: int, image_size: int, nf: int, ch_mult: tuple[int, ...],
                     num_res_blocks: int, attn_resolutions: tuple[int, ...],
                     dropout: float) -> list[int]:
    """Validate the UNet arguments; return the feature-map resolution of every level."""
    if in_channels < 1 or nf < 1 or num_res_blocks < 1:
        raise ValueError(f"in_channels, nf and num_res_blocks must be >= 1, got {in_channels}, "
                         f"{nf}, {num_res_blocks}")
    if not ch_mult or min(ch_mult) < 1:
        raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {ch_mult}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    factor = 2 ** (len(ch_mult) - 1)
    if image_size < 1 or image_size % factor:
        raise ValueError(f"image_size {image_size} must be divisible by 2^(len(ch_mult) - 1) = "
                         f"{factor} for ch_mult={ch_mult} (each level but the last halves it)")
    resolutions = [image_size // 2 ** level for level in range(len(ch_mult))]
    unreached = sorted(set(attn_resolutions) - set(resolutions))
    if unreached:
        raise ValueError(f"attn_resolutions {unreached} are not resolutions of this U-Net; "
                         f"with image_size={image_size} and ch_mult={ch_mult} they are {resolutions}")
    return resolutions
