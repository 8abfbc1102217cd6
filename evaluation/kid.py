"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs").

KID is the unbiased estimator of the squared maximum mean discrepancy (Gretton et al.
2012, Lemma 6) between two sets of Inception features under the cubic polynomial kernel

    k(x, y) = (x . y / d + 1)^3,
    MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
              - 2 sum_{i, j} k(x_i, y_j) / m^2,

averaged over random subsets of m samples from each set (the protocol of the authors' code,
also used by StyleGAN2-ADA and torch-fidelity: 100 subsets of size 1000; with fewer samples
the subset size becomes the smaller set's size). It is unbiased, so it can be negative.

Unlike FID it needs the features themselves, so a bounded uniform random sample of each
set's features is kept: for a stream of unknown length a `FeatureReservoir` (Vitter 1985,
Algorithm R); for a set of known size, possibly split between processes, an
`IndexedFeatureSample`, whose members are chosen by global index so that the sample does not
depend on the batching or on the number of processes.
"""
from __future__ import annotations

import numpy as np
import torch

KID_NUM_SUBSETS = 100
KID_SUBSET_SIZE = 1000


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x . y / d + 1)^3 for all pairs of rows, [n_x, n_y]."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between two equally sized samples [m, d] under `polynomial_kernel`."""
    m = x.shape[0]
    kernel_xx, kernel_yy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    within_x = (kernel_xx.sum() - np.trace(kernel_xx)) / (m * (m - 1))
    within_y = (kernel_yy.sum() - np.trace(kernel_yy)) / (m * (m - 1))
    return float(within_x + within_y - 2 * polynomial_kernel(x, y).mean())


def kid(
    features_1: np.ndarray | torch.Tensor,
    features_2: np.ndarray | torch.Tensor,
    *,
    num_subsets: int = KID_NUM_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> tuple[float, float]:
    """(mean, standard deviation) of the unbiased MMD^2 over `num_subsets` random subsets of
    min(subset_size, n_1, n_2) features drawn without replacement from each set, in float64.
    When that size is both sets' full size, the single estimate on the whole sets is returned."""
    set_1, set_2 = (np.asarray(torch.as_tensor(f).detach().cpu(), dtype=np.float64) for f in (features_1, features_2))
    if set_1.ndim != 2 or set_2.ndim != 2 or set_1.shape[1] != set_2.shape[1]:
        raise ValueError(f"kid needs two feature arrays [n, d] with the same d, got {set_1.shape} and {set_2.shape}")
    size = min(subset_size, len(set_1), len(set_2))
    if size < 2 or num_subsets < 1:
        raise ValueError(f"kid needs at least 2 features per set and 1 subset, got sizes "
                         f"{len(set_1)}, {len(set_2)} and num_subsets={num_subsets}")
    if size == len(set_1) == len(set_2):
        num_subsets = 1  # every subset would be both whole sets: one estimate, standard deviation 0
    rng = np.random.default_rng(seed)
    estimates = [
        mmd2_unbiased(set_1[rng.choice(len(set_1), size, replace=False)], set_2[rng.choice(len(set_2), size, replace=False)])
        for _ in range(num_subsets)
    ]
    return float(np.mean(estimates)), float(np.std(estimates))


class FeatureReservoir:
    """A uniform random sample of at most `capacity` of the feature vectors seen so far
    (reservoir sampling, Vitter 1985, Algorithm R), stored in float32.

    Until `capacity` vectors have been seen it holds all of them, in order. `merge` combines
    two reservoirs of equal capacity into a uniform sample of the union of their streams
    (e.g. after gathering the reservoirs of several processes).
    """

    def __init__(self, capacity: int, dim: int, seed: int = 0):
        if capacity < 1 or dim < 1:
            raise ValueError(f"reservoir capacity and dimension must be positive, got {capacity} and {dim}")
        self.capacity = capacity
        self.dim = dim
        self.seen = 0
        self.rng = np.random.default_rng(seed)
        self._chunks: list[np.ndarray] = []  # batches kept while fewer than `capacity` have been seen
        self._full: np.ndarray | None = None  # the reservoir once it is full

    @property
    def features(self) -> np.ndarray:
        """The sampled features, [min(seen, capacity), dim]."""
        if self._full is not None:
            return self._full
        return np.concatenate(self._chunks) if self._chunks else np.zeros((0, self.dim), dtype=np.float32)

    def update(self, features: np.ndarray | torch.Tensor) -> None:
        """Offer a batch [B, dim]; vector number n (0-based over all batches) enters with
        probability capacity / (n + 1), replacing a uniformly chosen member."""
        batch = np.asarray(torch.as_tensor(features).detach().cpu(), dtype=np.float32)
        if batch.ndim != 2 or batch.shape[1] != self.dim:
            raise ValueError(f"features must have shape [B, {self.dim}], got {batch.shape}")
        room = max(self.capacity - self.seen, 0)
        if room:
            self._chunks.append(batch[:room].copy())
            self.seen += min(room, len(batch))
            if self.seen == self.capacity:
                self._full, self._chunks = np.concatenate(self._chunks), []
        overflow = batch[room:]
        if len(overflow):
            slots = self.rng.integers(0, self.seen + np.arange(len(overflow)) + 1)  # slot of vector n ~ U{0..n}
            entering = slots < self.capacity
            for vector, slot in zip(overflow[entering], slots[entering]):  # in stream order: later ones win
                self._full[slot] = vector
            self.seen += len(overflow)

    def merge(self, other: "FeatureReservoir") -> None:
        """Replace this reservoir by a uniform sample of the union of both streams: the number
        taken from this one is hypergeometric(seen_self, seen_other, new size)."""
        if (other.dim, other.capacity) != (self.dim, self.capacity):
            raise ValueError(f"cannot merge a reservoir of {other.capacity} {other.dim}-d vectors into one of "
                             f"{self.capacity} {self.dim}-d vectors; dimension and capacity must match")
        total = self.seen + other.seen
        if total == 0:
            return
        size = min(self.capacity, total)
        from_self = int(self.rng.hypergeometric(self.seen, other.seen, size))
        own, theirs = self.features, other.features
        merged = np.concatenate([  # sorted picks: a merge below capacity keeps both streams' order
            own[np.sort(self.rng.choice(len(own), from_self, replace=False))],
            theirs[np.sort(self.rng.choice(len(theirs), size - from_self, replace=False))],
        ])
        self.seen = total
        self._chunks, self._full = ([], merged) if size == self.capacity else ([merged], None)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """features [min(seen, capacity), dim] (float32) and seen (int64 scalar)."""
        return {"features": self.features, "seen": np.asarray(self.seen, dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], capacity: int | None = None, seed: int = 0) -> "FeatureReservoir":
        """Inverse of `to_arrays`; capacity defaults to the number of stored features."""
        features = np.asarray(arrays["features"], dtype=np.float32)
        seen = int(np.asarray(arrays["seen"]))
        reservoir = cls(capacity or max(len(features), 1), features.shape[1], seed)
        if len(features) != min(seen, reservoir.capacity):
            raise ValueError(f"a reservoir of capacity {reservoir.capacity} that saw {seen} vectors "
                             f"holds {min(seen, reservoir.capacity)}, got {len(features)}")
        reservoir.seen = seen
        if seen >= reservoir.capacity:
            reservoir._full = features.copy()
        elif len(features):
            reservoir._chunks = [features.copy()]
        return reservoir


def kid_sample_indices(count: int, capacity: int, seed: int = 0) -> np.ndarray:
    """Sorted global indices of the feature vectors a KID sample of a set of ``count`` keeps:
    all of them when ``count <= capacity``, else ``capacity`` drawn uniformly without
    replacement by a generator seeded with ``seed``."""
    if count < 1 or capacity < 1:
        raise ValueError(f"a KID sample needs count >= 1 and capacity >= 1, got {count} and {capacity}")
    if count <= capacity:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, capacity, replace=False))


class IndexedFeatureSample:
    """A uniform sample of at most ``capacity`` of the ``count`` feature vectors of a set whose
    batches may be spread over several processes (float32, like `FeatureReservoir`).

    The members are fixed up front by index (`kid_sample_indices`); each process `update`s
    with its own batches and their first global index and fills the rows of the members it
    sees, leaving zeros elsewhere. Every member is filled by exactly one process, so summing
    the processes' `to_arrays` (all_reduce) is exact and `load_arrays` of the sum gives the
    sample of one process that saw every batch, in index order.
    """

    def __init__(self, count: int, capacity: int, dim: int, seed: int = 0):
        if dim < 1:
            raise ValueError(f"feature dimension must be a positive integer, got {dim}")
        self.count, self.capacity, self.dim = count, capacity, dim
        self.indices = kid_sample_indices(count, capacity, seed)
        self.rows = np.zeros((len(self.indices), dim), dtype=np.float32)
        self.filled = 0

    def update(self, features: np.ndarray | torch.Tensor, first_index: int) -> None:
        """Offer a batch [B, dim] holding the vectors first_index .. first_index + B - 1."""
        batch = np.asarray(torch.as_tensor(features).detach().cpu(), dtype=np.float32)
        if batch.ndim != 2 or batch.shape[1] != self.dim:
            raise ValueError(f"features must have shape [B, {self.dim}], got {batch.shape}")
        if first_index < 0 or first_index + len(batch) > self.count:
            raise ValueError(f"vectors {first_index}..{first_index + len(batch) - 1} are outside the "
                             f"set of {self.count}")
        start, stop = np.searchsorted(self.indices, [first_index, first_index + len(batch)])
        self.rows[start:stop] = batch[self.indices[start:stop] - first_index]
        self.filled += int(stop - start)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """kid_rows [min(count, capacity), dim] float32 and kid_filled (int64 scalar): they add
        up over the processes that share the set."""
        return {"kid_rows": self.rows, "kid_filled": np.asarray(self.filled, dtype=np.int64)}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Take the state from ``arrays`` (e.g. `to_arrays` summed over processes)."""
        rows = np.asarray(arrays["kid_rows"], dtype=np.float32)
        if rows.shape != self.rows.shape:
            raise ValueError(f"kid_rows must have shape {self.rows.shape}, got {rows.shape}")
        self.rows, self.filled = rows.copy(), int(np.asarray(arrays["kid_filled"]))

    def reservoir(self) -> FeatureReservoir:
        """The complete sample as a `FeatureReservoir` that has seen all ``count`` vectors."""
        if self.filled != len(self.indices):
            raise ValueError(f"the KID sample has {self.filled} of its {len(self.indices)} vectors; "
                             f"every batch of the {self.count} must be offered (once) first")
        return FeatureReservoir.from_arrays({"features": self.rows, "seen": self.count},
                                            capacity=self.capacity)
