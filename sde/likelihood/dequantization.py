"""Dequantization: from a pmf over 8-bit pixels to a density the ODE can evaluate.

**Bits/dim of 8-bit images** (uniform dequantization, Theis et al. 2016; Ho et al. 2020
sec. 4). For pixel values u in {0..255}^D and v ~ U[0,1)^D, the point w = u + v lies in
[0, 256)^D and any density p_w there defines a pmf P(u) = int_{[0,1)^D} p_w(u + v) dv
with, by Jensen, -log P(u) <= E_v[-log p_w(u + v)]. The model sees the affine image
x = a w + b (``sde.data.uint8_to_float``: a = 2/256, b = -1, x in [-1, 1)); the change of
variables p_w(w) = p_x(x) |dx/dw| = p_x(x) a^D gives

    bits/dim = -log p_w(w) / (D ln 2) = -log p_x(x) / (D ln 2) - log2(a)
             = -log p_x(x) / (D ln 2) + log2(256) - log2(2)        (= ... + 7 for 8 bits),

the value score_sde writes as a magic ``offset = 7 - inverse_scaler(-1)``. In expectation
over v this bounds -log2 P(u) / D >= 0 from above, so it cannot go negative, while a
continuous density evaluated on the raw pixel grid can (and does, for sharp models).

**Truncated-normal dequantization** (Zheng et al. 2023, "Improved Techniques for Maximum
Likelihood Estimation for Diffusion ODEs", training-free truncated-normal dequantization).
Uniform points fill each pixel's bin evenly, but a network trained on the pixel grid only
ever saw grid points plus Gaussian noise. Give pixel u the interval B_u of half-width h
centred on the value c_u the network was trained on (plain map: c_u = 2u/255 - 1,
h = 1/255; dequantized training: c_u = 2(u + 1/2)/256 - 1, h = 1/256); the B_u tile the
line. At a time t0 > 0 the ODE density p_t0 of x_t0 defines the pmf
P(u) = int_{alpha_t0 B_u} p_t0(y) dy (the scaled bins are disjoint, so sum_u P(u) <= 1),
and for any density q(y | u) inside alpha_t0 B_u, by Jensen,

    -log P(u) <= E_q[log q(y | u) - log p_t0(y)].

Take q = the training noise at t0 truncated to the bin: y = alpha_t0 c_u + sigma_t0 z with
z ~ N(0, I) truncated to [-tau, tau]^D, tau = alpha_t0 h / sigma_t0, so that

    log q(y | u) = sum_d [-log(sigma_t0 sqrt(2 pi)) - log Z - z_d^2 / 2],  Z = erf(tau / sqrt 2).

``truncation`` is tau; t0 solves lambda(t0) = log(alpha_t0 / sigma_t0) = log(tau / h).
Large tau puts t0 where the network was trained least well and q nearly untruncated;
tau -> 0 makes q uniform on the bin at a noisy t0 where p_t0 spreads over neighbouring
bins. No Jacobian enters: y and p_t0 live in the same space.
"""
from __future__ import annotations

import math

import torch

from sde.data import MAX_PIXEL_VALUE, NUM_PIXEL_LEVELS, uint8_to_float
from sde import randomness
from sde.sdes import SDE

Tensor = torch.Tensor

DEQUANTIZATIONS = ("uniform", "truncated_normal")
#: tau of truncated-normal dequantization, in standard deviations of the noise at t0 (module
#: docstring); chosen on training images of the released model (``python -m
#: bench.investigations.dequantization --split test``, BENCHMARKS.md).
DEFAULT_TRUNCATION = 2.0

#: dx/dw of the dequantized map x = (u + v) * 2 / NUM_PIXEL_LEVELS - 1, w = u + v.
DEQUANTIZED_SLOPE = 2.0 / NUM_PIXEL_LEVELS
#: Spacing of the plain map x = u * 2 / MAX_PIXEL_VALUE - 1 (the DDPM decoder's pixel grid).
PLAIN_SLOPE = 2.0 / MAX_PIXEL_VALUE


def dequantized_bits_per_dim(log_px: Tensor, num_dims: int) -> Tensor:
    """Bits/dim of the pixels from log p_x(x) of their dequantized, scaled image x.

    bits/dim = -log p_x(x) / (D ln 2) - log2(a) with a = dx/dw = DEQUANTIZED_SLOPE
    (module docstring).
    """
    return -log_px / (num_dims * math.log(2.0)) - math.log2(DEQUANTIZED_SLOPE)


def truncation_time(sde: SDE, truncation: float, dequantized_grid: bool = False) -> float:
    """t0 of truncated-normal dequantization: lambda(t0) = log(tau / h) (module docstring)."""
    if not truncation > 0:
        raise ValueError(f"truncation (tau) must be > 0, got {truncation}")
    half_width = (DEQUANTIZED_SLOPE if dequantized_grid else PLAIN_SLOPE) / 2
    log_snr = torch.tensor(math.log(truncation / half_width), dtype=torch.float64)
    lowest, highest = (sde.log_snr(torch.tensor(t, dtype=torch.float64)).item() for t in (sde.T, 0.0))
    if not lowest < log_snr.item() < highest:
        raise ValueError(f"truncation tau={truncation} puts t0 outside (0, T): its log-SNR "
                         f"{log_snr.item():.3f} is not in ({lowest:.3f}, {highest:.3f}); take "
                         f"tau in ({half_width * math.exp(lowest):.3g}, {half_width * math.exp(highest):.3g})")
    return sde.t_from_log_snr(log_snr).item()


def truncated_normal_dequantization(sde: SDE, images: Tensor, truncation: float, *,
                                    dequantized_grid: bool = False,
                                    generator: torch.Generator | None = None
                                    ) -> tuple[Tensor, float, Tensor]:
    """(y, t0, log q(y | u)) of truncated-normal dequantization (module docstring): y [B, ...]
    float64 on ``images``' device, log q [B] in nats. ``dequantized_grid``: the network was
    trained on dequantized pixels (bins centred on (u + 1/2)), else on the plain grid."""
    t0 = truncation_time(sde, truncation, dequantized_grid)
    t0_tensor = torch.tensor(t0, dtype=torch.float64)
    alpha, sigma = sde.alpha(t0_tensor).item(), sde.sigma(t0_tensor).item()
    if dequantized_grid:
        centers = (images.double() + 0.5) * DEQUANTIZED_SLOPE - 1.0
    else:
        centers = uint8_to_float(images, dequantize=False).double()
    # inverse-CDF draws of N(0, 1) truncated to [-tau, tau]
    low = torch.special.ndtr(torch.tensor(-truncation, dtype=torch.float64)).item()
    uniforms = randomness.rand(images.shape, generator=generator, dtype=torch.float64, device=images.device)
    z = torch.special.ndtri(low + (1.0 - 2.0 * low) * uniforms)
    log_mass = math.log(math.erf(truncation / math.sqrt(2.0)))
    log_q = (-math.log(sigma * math.sqrt(2.0 * math.pi)) - log_mass - 0.5 * z ** 2).flatten(1).sum(1)
    return alpha * centers + sigma * z, t0, log_q
