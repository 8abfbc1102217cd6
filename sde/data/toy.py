"""Toy data generated from the seed: 2-D (one Gaussian, a mixture of two, a spiral) and
1-D (one Gaussian, a mixture of two), the sets the teaching material noises and denoises.

The Gaussian sets come with their closed form (``toy_mixture``): density, noised marginals
and exact score, so a learned score can be compared with the exact one and the exact score
can stand in for a network (``model.name = "exact"``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import ml_collections
import torch

from sde import randomness
from sde.data.datasets import Dataset, register
from sde.data.seeds import TOY_STREAM, derived_generator

Tensor = torch.Tensor

TOY_NAMES = ("gaussian", "two_gaussians", "spiral", "gaussian_1d", "two_gaussians_1d")
#: The toy sets' splits: independent draws of the same distribution.
TOY_SPLITS = ("train", "test")
#: Dimension of the 2-D sets' points (the 1-D sets' is 1; ``toy_dim``).
TOY_DIM = 2
#: The sets with a closed-form density (Gaussian mixtures).
CLOSED_FORM_NAMES = ("gaussian", "two_gaussians", "gaussian_1d", "two_gaussians_1d")

#: "gaussian": N(mean, cov), std (0.6, 0.4) and correlation 0.5.
GAUSSIAN_MEAN = (0.5, -0.25)
GAUSSIAN_COV = ((0.36, 0.12), (0.12, 0.16))
#: "two_gaussians": 0.3 N(means[0], covs[0]) + 0.7 N(means[1], covs[1]); unequal weights
#: and covariances so that a swapped component shows up in any test.
TWO_GAUSSIANS_WEIGHTS = (0.3, 0.7)
TWO_GAUSSIANS_MEANS = ((-1.0, -0.5), (1.0, 0.5))
TWO_GAUSSIANS_COVS = (((0.09, 0.0), (0.0, 0.04)), ((0.04, 0.02), (0.02, 0.09)))
#: "spiral": radius r = sqrt(w), w ~ U(0, 1) (uniform over the disc's area, so points are
#: spread evenly along the arm), angle 2 pi SPIRAL_TURNS r, plus N(0, SPIRAL_NOISE_STD^2 I).
SPIRAL_TURNS = 2.0
SPIRAL_NOISE_STD = 0.03
#: "gaussian_1d": N(GAUSSIAN_1D_MEAN, GAUSSIAN_1D_STD^2).
GAUSSIAN_1D_MEAN, GAUSSIAN_1D_STD = 1.0, 0.5
#: "two_gaussians_1d": 0.3 N(-1.5, 0.3^2) + 0.7 N(1.0, 0.5^2); unequal weights and widths.
TWO_GAUSSIANS_1D_WEIGHTS = (0.3, 0.7)
TWO_GAUSSIANS_1D_MEANS = (-1.5, 1.0)
TWO_GAUSSIANS_1D_STDS = (0.3, 0.5)


def toy_dim(name: str) -> int:
    """Dimension of toy set ``name``'s points."""
    if name not in TOY_NAMES:
        raise ValueError(f"unknown toy set {name!r}; valid: {', '.join(TOY_NAMES)}")
    return 1 if name.endswith("_1d") else TOY_DIM


@dataclass(frozen=True)
class GaussianMixture:
    """``sum_k weights[k] N(means[k], covariances[k])`` in float64; K = 1 is one Gaussian.

    The closed form lets tests compare a learned score with the exact one: under an SDE
    with x_t = alpha x_0 + sigma z the marginal is the mixture with means ``alpha mu_k``
    and covariances ``alpha^2 Sigma_k + sigma^2 I``.
    """

    weights: Tensor      # [K]
    means: Tensor        # [K, D]
    covariances: Tensor  # [K, D, D]

    def sample(self, num_samples: int, generator: torch.Generator) -> Tensor:
        """float32 [num_samples, D]: component k ~ weights, then mu_k + chol(Sigma_k) z."""
        components = randomness.multinomial(self.weights, num_samples, replacement=True, generator=generator)
        normal = randomness.randn((num_samples, self.means.shape[1]), generator=generator, dtype=torch.float64)
        cholesky = torch.linalg.cholesky(self.covariances)
        points = self.means[components] + torch.einsum("nij,nj->ni", cholesky[components], normal)
        return points.to(torch.float32)

    def noised(self, alpha: float, sigma: float) -> "GaussianMixture":
        """The law of alpha x_0 + sigma z: components N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)."""
        eye = torch.eye(self.means.shape[1], dtype=torch.float64)
        return GaussianMixture(self.weights, alpha * self.means, alpha ** 2 * self.covariances + sigma ** 2 * eye)

    def component_log_probs(self, x: Tensor) -> Tensor:
        """[N, K] log(w_k N(x; mu_k, Sigma_k)) in float64 (x: [N, D])."""
        x = x.to(torch.float64)
        cholesky = torch.linalg.cholesky(self.covariances)                       # [K, D, D]
        diff = x[:, None, :] - self.means[None]                                  # [N, K, D]
        white = torch.linalg.solve_triangular(cholesky[None], diff[..., None], upper=False)[..., 0]
        log_det = 2 * torch.log(torch.diagonal(cholesky, dim1=-2, dim2=-1)).sum(-1)  # [K]
        dim = self.means.shape[1]
        return (torch.log(self.weights)[None] - 0.5 * (white ** 2).sum(-1)
                - 0.5 * log_det[None] - 0.5 * dim * math.log(2 * math.pi))

    def log_prob(self, x: Tensor) -> Tensor:
        """[N] log density of the mixture at x [N, D], float64."""
        return torch.logsumexp(self.component_log_probs(x), dim=1)

    def score(self, x: Tensor) -> Tensor:
        """[N, D] grad_x log p(x) = -sum_k r_k(x) Sigma_k^{-1} (x - mu_k), float64, with the
        responsibilities r_k(x) = w_k N(x; mu_k, Sigma_k) / p(x)."""
        x = x.to(torch.float64)
        responsibility = torch.softmax(self.component_log_probs(x), dim=1)       # [N, K]
        diff = x[:, None, :] - self.means[None]                                  # [N, K, D]
        precision_diff = torch.linalg.solve(self.covariances[None], diff[..., None])[..., 0]
        return -(responsibility[..., None] * precision_diff).sum(1)


def toy_mixture(name: str) -> GaussianMixture:
    """Closed-form parameters of the toy set ``name`` ("gaussian" or "two_gaussians")."""
    def as_tensor(values: Sequence) -> Tensor:
        return torch.tensor(values, dtype=torch.float64)

    if name == "gaussian":
        return GaussianMixture(as_tensor([1.0]), as_tensor([GAUSSIAN_MEAN]), as_tensor([GAUSSIAN_COV]))
    if name == "two_gaussians":
        return GaussianMixture(as_tensor(TWO_GAUSSIANS_WEIGHTS), as_tensor(TWO_GAUSSIANS_MEANS),
                               as_tensor(TWO_GAUSSIANS_COVS))
    if name == "gaussian_1d":
        return GaussianMixture(as_tensor([1.0]), as_tensor([[GAUSSIAN_1D_MEAN]]), as_tensor([[[GAUSSIAN_1D_STD ** 2]]]))
    if name == "two_gaussians_1d":
        return GaussianMixture(as_tensor(TWO_GAUSSIANS_1D_WEIGHTS), as_tensor(TWO_GAUSSIANS_1D_MEANS)[:, None],
                               as_tensor(TWO_GAUSSIANS_1D_STDS)[:, None, None] ** 2)
    if name == "spiral":
        raise ValueError(f"the toy set 'spiral' has no closed-form density; closed forms exist for "
                         f"{', '.join(map(repr, CLOSED_FORM_NAMES))}")
    raise ValueError(f"unknown toy set {name!r}; valid: {', '.join(TOY_NAMES)}")


def sample_spiral(num_samples: int, generator: torch.Generator) -> Tensor:
    """float32 [num_samples, 2] on the noisy spiral documented at ``SPIRAL_TURNS``."""
    radius = randomness.rand(num_samples, generator=generator, dtype=torch.float64).sqrt()
    angle = 2 * math.pi * SPIRAL_TURNS * radius
    points = radius[:, None] * torch.stack([angle.cos(), angle.sin()], dim=1)
    noise = SPIRAL_NOISE_STD * randomness.randn((num_samples, 2), generator=generator, dtype=torch.float64)
    return (points + noise).to(torch.float32)


def load_toy(name: str, num_samples: int, seed: int, split: str) -> Tensor:
    """``num_samples`` float32 points [N, toy_dim(name)] of toy set ``name``; a function of
    (seed, split)."""
    if split not in TOY_SPLITS:
        raise ValueError(f"unknown toy split {split!r}; valid: {', '.join(TOY_SPLITS)}")
    if num_samples < 1:
        raise ValueError(f"toy_num_samples must be >= 1, got {num_samples}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    generator = derived_generator(TOY_STREAM, seed, TOY_SPLITS.index(split))
    if name == "spiral":
        return sample_spiral(num_samples, generator)
    return toy_mixture(name).sample(num_samples, generator)


def _load(data: ml_collections.ConfigDict, split: str, seed: int) -> tuple[Tensor, None]:
    return load_toy(data.toy_name, data.toy_num_samples, seed, split), None


def _check(data: ml_collections.ConfigDict) -> None:
    if data.toy_name not in TOY_NAMES:
        raise ValueError(f"unknown toy set {data.toy_name!r}; valid: {', '.join(TOY_NAMES)}")
    if data.random_flip:
        raise ValueError("random_flip applies to images; the toy sets are points")
    if data.dequantize:
        raise ValueError("dequantize applies to 8-bit images; the toy sets are already continuous")


DATASET = register(Dataset(name="toy", kind="points", splits=TOY_SPLITS, load=_load,
                           example_shape=lambda data: (toy_dim(data.toy_name),), check=_check))
