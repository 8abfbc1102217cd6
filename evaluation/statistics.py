"""Streaming feature moments and the Fréchet distance between Gaussians (FID).

FID (Heusel et al. 2017) fits a Gaussian to the Inception features of each image set and
reports the Fréchet (2-Wasserstein) distance between the two Gaussians, whose closed form
(Dowson & Landau 1982) is

    d^2 = ||mu_1 - mu_2||^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^{1/2}).

`FeatureStats` accumulates the sufficient statistics in float64 over batches, so no set of
features is ever held in memory and the sample count is not capped by a batch size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

NEGATIVE_TOLERANCE = 1e-6
"""Largest tolerated negative eigenvalue of a covariance (and of Sigma_1^{1/2} Sigma_2
Sigma_1^{1/2}), relative to its largest: covariances summed in float64 have rounding-size
negative eigenvalues, which are taken as 0; a larger one means a broken input."""

_STATE_KEYS = ("count", "feature_sum", "outer_sum")


def _as_float64(features: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    return np.asarray(features, dtype=np.float64)


class FeatureStats:
    """Count, sum and sum of outer products of d-dimensional features, in float64.

    The state is three plain sums (`to_arrays`), so statistics from several processes or
    runs combine by adding them: `merge`, or an all_reduce(SUM) of the three arrays followed
    by `from_arrays`. Mean and unbiased covariance come from the sums on demand.
    """

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"feature dimension must be a positive integer, got {dim}")
        self.dim = dim
        self.count = 0
        self.feature_sum = np.zeros(dim)
        self.outer_sum = np.zeros((dim, dim))

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add a batch of features [B, dim]."""
        batch = _as_float64(features)
        if batch.ndim != 2 or batch.shape[1] != self.dim:
            raise ValueError(f"features must have shape [B, {self.dim}], got {batch.shape}")
        self.count += batch.shape[0]
        self.feature_sum += batch.sum(axis=0)
        self.outer_sum += batch.T @ batch

    def merge(self, other: "FeatureStats") -> None:
        """Add another set's statistics into this one (the union of the two sets)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge {other.dim}-d statistics into {self.dim}-d ones")
        self.count += other.count
        self.feature_sum += other.feature_sum
        self.outer_sum += other.outer_sum

    def mean(self) -> np.ndarray:
        """Sample mean, [dim]."""
        if self.count < 1:
            raise ValueError("the mean needs at least one feature vector; call update() first")
        return self.feature_sum / self.count

    def covariance(self) -> np.ndarray:
        """Unbiased sample covariance (sum of outer products - n mu mu^T) / (n - 1), [dim, dim]."""
        if self.count < 2:
            raise ValueError(f"the covariance needs at least 2 feature vectors, got {self.count}")
        mean = self.mean()
        covariance = (self.outer_sum - self.count * np.outer(mean, mean)) / (self.count - 1)
        return (covariance + covariance.T) / 2

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The raw sufficient statistics: count (int64 scalar), feature_sum, outer_sum."""
        return {"count": np.asarray(self.count, dtype=np.int64), "feature_sum": self.feature_sum,
                "outer_sum": self.outer_sum}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "FeatureStats":
        """Inverse of `to_arrays` (also accepts summed arrays from several processes)."""
        missing = [key for key in _STATE_KEYS if key not in arrays]
        if missing:
            raise ValueError(f"feature statistics need arrays {_STATE_KEYS}, missing {missing}")
        feature_sum = _as_float64(arrays["feature_sum"])
        stats = cls(feature_sum.shape[0])
        stats.count = int(np.asarray(arrays["count"]))
        stats.feature_sum = feature_sum.copy()
        stats.outer_sum = _as_float64(arrays["outer_sum"]).copy()
        if stats.outer_sum.shape != (stats.dim, stats.dim):
            raise ValueError(f"outer_sum must have shape {(stats.dim, stats.dim)}, got {stats.outer_sum.shape}")
        return stats

    def save(self, path: str | Path) -> None:
        """Write the sufficient statistics to an .npz file (no pickle)."""
        np.savez(path, **self.to_arrays())

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        """Read statistics written by `save` (np.load with allow_pickle=False)."""
        with np.load(path, allow_pickle=False) as arrays:
            return cls.from_arrays(dict(arrays))


def _psd_eigenvalues(matrix: np.ndarray, name: str, vectors: bool = False):
    """The eigenvalues, clipped at 0 (and with ``vectors`` the eigenvectors), of a symmetric
    positive semi-definite matrix, or a ValueError when one is negative beyond rounding
    (``NEGATIVE_TOLERANCE``)."""
    symmetric = (matrix + matrix.T) / 2
    values, vectors = np.linalg.eigh(symmetric) if vectors else (np.linalg.eigvalsh(symmetric), None)
    scale = max(float(np.abs(values).max(initial=0.0)), np.finfo(np.float64).tiny)
    if values.min(initial=0.0) < -NEGATIVE_TOLERANCE * scale:
        raise ValueError(f"{name} has the eigenvalue {values.min():.3g}: covariances must be symmetric positive "
                         f"semi-definite")
    clipped = np.clip(values, 0.0, None)
    return (clipped, vectors) if vectors is not None else clipped


def frechet_distance(
    mu_1: np.ndarray, sigma_1: np.ndarray, mu_2: np.ndarray, sigma_2: np.ndarray
) -> float:
    """||mu_1 - mu_2||^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^{1/2}) (Dowson & Landau
    1982; the FID of Heusel et al. 2017).

    The trace of the square root needs no general matrix square root: Sigma_1 Sigma_2 is
    similar to the symmetric PSD matrix M = Sigma_1^{1/2} Sigma_2 Sigma_1^{1/2} (conjugate by
    Sigma_1^{1/2}), so Tr (Sigma_1 Sigma_2)^{1/2} = sum_i sqrt(lambda_i(M)). Two symmetric
    eigendecompositions give it, far faster than a general square root (scipy.linalg.sqrtm's Schur
    method) of 2048 x 2048 Inception covariances, and exact for singular covariances (fewer
    images than features) without a regularising offset. A covariance that is not positive
    semi-definite beyond rounding raises ValueError.
    """
    mu_1, mu_2 = np.atleast_1d(_as_float64(mu_1)), np.atleast_1d(_as_float64(mu_2))
    sigma_1, sigma_2 = np.atleast_2d(_as_float64(sigma_1)), np.atleast_2d(_as_float64(sigma_2))
    dim = mu_1.shape[0]
    if mu_1.shape != (dim,) or mu_2.shape != (dim,) or sigma_1.shape != (dim, dim) or sigma_2.shape != (dim, dim):
        raise ValueError(
            f"frechet_distance needs means of shape [d] and covariances [d, d] with one d, got "
            f"{mu_1.shape}, {sigma_1.shape}, {mu_2.shape}, {sigma_2.shape}"
        )
    _psd_eigenvalues(sigma_2, "Sigma_2")
    values, vectors = _psd_eigenvalues(sigma_1, "Sigma_1", vectors=True)
    root_1 = (vectors * np.sqrt(values)) @ vectors.T
    product_values = _psd_eigenvalues(root_1 @ sigma_2 @ root_1, "Sigma_1^(1/2) Sigma_2 Sigma_1^(1/2)")
    trace_sqrt_product = np.sqrt(product_values).sum()
    mean_difference = mu_1 - mu_2
    return float(mean_difference @ mean_difference + np.trace(sigma_1) + np.trace(sigma_2) - 2 * trace_sqrt_product)


def fid(stats_1: FeatureStats, stats_2: FeatureStats) -> float:
    """Fréchet distance between the Gaussians fitted to two sets of features."""
    return frechet_distance(stats_1.mean(), stats_1.covariance(), stats_2.mean(), stats_2.covariance())
