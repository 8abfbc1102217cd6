"""Exact noise predictors for data whose every noised marginal is known in closed form.

For x_t = alpha x0 + sigma z with x0 ~ N(mu, diag(s^2)), the marginal is
p_t = N(alpha mu, diag(alpha^2 s^2 + sigma^2)), so the score is
-(x - alpha mu) / (alpha^2 s^2 + sigma^2) and the exact noise prediction
eps*(x, t) = -sigma * score is

    eps*(x, t) = sigma (x - alpha mu) / (alpha^2 s^2 + sigma^2).

For a mixture sum_k w_k N(mu_k, diag(s_k^2)), p_t is the mixture of the noised components
with the same weights, its score is the responsibility-weighted sum of theirs, so

    eps*(x, t) = sigma sum_k r_k(x, t) (x - alpha mu_k) / (alpha^2 s_k^2 + sigma^2),
    r_k(x, t) = w_k N(x; alpha mu_k, alpha^2 s_k^2 + sigma^2) / p_t(x).
"""
from __future__ import annotations

import math

import torch

from sde import randomness

Tensor = torch.Tensor


class GaussianMixtureOracle:
    """``model(x, t) -> eps`` exact for data sum_k w_k N(mu_k, diag(s_k^2)) in D dimensions.

    Args:
      sde: supplies alpha(t), sigma(t).
      weights: [K] mixture weights (normalised here).
      means, stds: [K, D] component means and standard deviations.
    Attributes:
      calls: number of evaluations; times: the distinct t values seen, in order.
    """

    def __init__(self, sde, weights, means, stds):
        self.sde = sde
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        self.calls = 0
        self.times: list[float] = []

    @classmethod
    def gaussian(cls, sde, mean, std) -> "GaussianMixtureOracle":
        """A single Gaussian N(mean, diag(std^2))."""
        return cls(sde, [1.0], [list(mean)], [list(std)])

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        self.times.append(float(t[0].detach()))
        x64, t64 = x.to(torch.float64), t.to(torch.float64)
        alpha = self.sde.alpha(t64)[:, None, None]           # [B, 1, 1]
        sigma = self.sde.sigma(t64)[:, None, None]
        var = alpha ** 2 * self.stds[None] ** 2 + sigma ** 2  # [B, K, D]
        diff = x64[:, None, :] - alpha * self.means[None]     # [B, K, D]
        log_density = (torch.log(self.weights)[None]
                       - 0.5 * (diff ** 2 / var + torch.log(2 * math.pi * var)).sum(-1))
        responsibility = torch.softmax(log_density, dim=1)[:, :, None]
        eps = sigma[:, 0] * (responsibility * diff / var).sum(1)
        return eps.to(x.dtype)

    @property
    def mean(self) -> Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    @property
    def variance(self) -> Tensor:
        second_moment = (self.weights[:, None] * (self.stds ** 2 + self.means ** 2)).sum(0)
        return second_moment - self.mean ** 2

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n draws from the data distribution (float64)."""
        component = randomness.multinomial(self.weights, n, replacement=True, generator=generator)
        z = randomness.randn((n, self.means.shape[1]), generator=generator, dtype=torch.float64)
        return self.means[component] + self.stds[component] * z
