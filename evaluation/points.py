"""Distance between two sets of points: the sliced Wasserstein-2 distance.

For laws mu, nu on R^D, SW_2(mu, nu)^2 = E_theta W_2(theta#mu, theta#nu)^2 over directions
theta uniform on the sphere (Rabin et al. 2011; Bonneel et al. 2015), and in one dimension
W_2 between two empirical laws of n points each is the root mean squared difference of the
sorted values. So the estimate is exact in 1-D (the one direction up to sign) and a Monte
Carlo average over ``projections`` random directions otherwise. It is a metric on laws, it
is zero only for equal laws, and between two independent samples of one law it is not zero:
compare a model's figure with that floor.
"""
from __future__ import annotations

import torch

from sde import randomness

Tensor = torch.Tensor

#: Random directions of the Monte Carlo average (D > 1).
DEFAULT_PROJECTIONS = 512


def sliced_wasserstein(a: Tensor, b: Tensor, *, projections: int = DEFAULT_PROJECTIONS,
                       generator: torch.Generator | None = None) -> float:
    """SW_2 between the empirical laws of ``a`` and ``b`` ([N, D] each, the same N), float64."""
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs two [N, D] sets of one shape, got {list(a.shape)} "
                         f"and {list(b.shape)}")
    if projections < 1:
        raise ValueError(f"projections must be >= 1, got {projections}")
    a, b = a.to(torch.float64), b.to(torch.float64)
    dim = a.shape[1]
    if dim == 1:
        directions = torch.ones(1, 1, dtype=torch.float64, device=a.device)
    else:
        directions = randomness.randn((projections, dim), generator=generator, dtype=torch.float64, device=a.device)
        directions = directions / directions.norm(dim=1, keepdim=True)
    b = b.to(a.device)
    projected_a = torch.sort(a @ directions.T, dim=0).values   # [N, P]
    projected_b = torch.sort(b @ directions.T, dim=0).values
    return float(((projected_a - projected_b) ** 2).mean().sqrt())
