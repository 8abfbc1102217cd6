"""FID and KID of image sets: features of uint8 image batches, cached reference statistics.

Protocol: TF Inception-v3 (2015-12-05) pool features (`evaluation.inception`); FID from
the exact streaming mean and covariance of all images (`evaluation.statistics`); KID from a
uniform random sample of at most `KID_RESERVOIR_SIZE` feature vectors per set
(`evaluation.kid`). Reference statistics of a dataset are computed once and cached as
``<cache_dir>/inception_<dataset>_<split>_<count>[_<key digest>].npz``, the key (what the
statistics depend on besides the images' names: their pixels' digest, the extractor's
weights and preprocessing) written inside the file and compared on every load.

A set of known size may be split between processes (`FeatureAccumulator`): its state is
sums, so the processes' arrays add up to those of the whole set, whatever the split.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from evaluation.inception import FEATURE_DIM
from evaluation.kid import KID_NUM_SUBSETS, KID_SUBSET_SIZE, FeatureReservoir, IndexedFeatureSample, kid
from evaluation.statistics import FeatureStats, fid

try:
    import fcntl
except ImportError:  # not POSIX: concurrent first computations each compute (and both write atomically)
    fcntl = None

logger = logging.getLogger(__name__)

KID_RESERVOIR_SIZE = 10 * KID_SUBSET_SIZE
"""Feature vectors kept per set for KID: ten standard subsets' worth (80 MB of float32 at
d = 2048). FID always uses every image; KID subsets are drawn from this uniform sample."""

ImageBatches = Iterable[torch.Tensor | np.ndarray]
FeatureExtractor = Callable[[torch.Tensor | np.ndarray], torch.Tensor]
ArraySum = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]
"""Sums each named array over the processes that share a set (an all_reduce)."""


class FeatureSet:
    """What FID and KID need from one image set: exact streaming moments (`stats`) and a
    bounded uniform sample of the features (`reservoir`). Saved as one .npz, no pickle."""

    def __init__(self, stats: FeatureStats, reservoir: FeatureReservoir, metadata: Mapping[str, Any] | None = None):
        if stats.dim != reservoir.dim:
            raise ValueError(f"statistics ({stats.dim}-d) and KID reservoir ({reservoir.dim}-d) disagree on the dimension")
        self.stats = stats
        self.reservoir = reservoir
        self.metadata = dict(metadata or {})  # JSON-able facts saved with the set (a cache key)

    @classmethod
    def empty(cls, dim: int = FEATURE_DIM, kid_capacity: int = KID_RESERVOIR_SIZE, seed: int = 0) -> "FeatureSet":
        """No features yet; `update` adds them."""
        return cls(FeatureStats(dim), FeatureReservoir(kid_capacity, dim, seed))

    @property
    def count(self) -> int:
        return self.stats.count

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add a batch of features [B, dim]."""
        self.stats.update(features)
        self.reservoir.update(features)

    def merge(self, other: "FeatureSet") -> None:
        """Combine with another set's features (e.g. another process's share of the images)."""
        self.stats.merge(other.stats)
        self.reservoir.merge(other.reservoir)

    def save(self, path: str | Path) -> None:
        """Write atomically to `path` (.npz): a temporary file named with this process's id
        (``.<name>.<pid>.<random>.tmp``, the toolkit's convention, so that a later process can
        tell a dead writer's leftover from a live one's), fsync'ed, renamed over `path`, and
        removed if anything fails (SIGTERM included, as an exception)."""
        path = Path(path)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        reservoir = self.reservoir.to_arrays()
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez(file, **self.stats.to_arrays(), kid_features=reservoir["features"],
                         kid_seen=reservoir["seen"], kid_capacity=np.asarray(self.reservoir.capacity, dtype=np.int64),
                         metadata=np.asarray(json.dumps(self.metadata, sort_keys=True)))
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> "FeatureSet":
        """Read a file written by `save` (np.load with allow_pickle=False)."""
        with np.load(path, allow_pickle=False) as arrays:
            stats = FeatureStats.from_arrays(dict(arrays))
            reservoir = FeatureReservoir.from_arrays(
                {"features": arrays["kid_features"], "seen": arrays["kid_seen"]}, capacity=int(arrays["kid_capacity"])
            )
            metadata = json.loads(str(arrays["metadata"])) if "metadata" in arrays.files else {}
        return cls(stats, reservoir, metadata)


class FeatureAccumulator:
    """The `FeatureSet` of a set of ``count`` feature vectors whose batches arrive with their
    first global index, possibly spread over several processes.

    Moments are `FeatureStats` sums and the KID sample an `IndexedFeatureSample`, so each
    process's `to_arrays` adds up (all_reduce) to the arrays of the whole set; after
    `load_arrays` of the sum, `feature_set` is the same in every process and for any number
    of processes (the moments up to the order of float64 additions, the KID sample exactly).
    """

    def __init__(self, count: int, dim: int = FEATURE_DIM, kid_capacity: int = KID_RESERVOIR_SIZE, seed: int = 0):
        self.count = count
        self.stats = FeatureStats(dim)
        self.kid_sample = IndexedFeatureSample(count, kid_capacity, dim, seed)

    def update(self, features: torch.Tensor | np.ndarray, first_index: int) -> None:
        """Add a batch [B, dim]: the vectors first_index .. first_index + B - 1 of the set."""
        self.kid_sample.update(features, first_index)
        self.stats.update(features)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """FeatureStats and KID sample arrays; they add up over the processes."""
        return {**self.stats.to_arrays(), **self.kid_sample.to_arrays()}

    def load_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Take the state from ``arrays`` (e.g. `to_arrays` summed over processes)."""
        self.stats = FeatureStats.from_arrays(dict(arrays))
        self.kid_sample.load_arrays(arrays)

    def feature_set(self) -> FeatureSet:
        """The finished set; every one of the ``count`` vectors must have been added."""
        if self.stats.count != self.count:
            raise ValueError(f"the feature set has {self.stats.count} of its {self.count} vectors")
        return FeatureSet(self.stats, self.kid_sample.reservoir())


def image_feature_set(
    images: ImageBatches, extractor: FeatureExtractor, *, kid_capacity: int = KID_RESERVOIR_SIZE, seed: int = 0
) -> FeatureSet:
    """Stream uint8 image batches [B, C, H, W] through `extractor` (an `InceptionFeatures`)."""
    feature_set = None
    for batch in images:
        features = extractor(batch)
        if feature_set is None:
            feature_set = FeatureSet.empty(features.shape[1], kid_capacity, seed)
        feature_set.update(features)
    if feature_set is None:
        raise ValueError("image_feature_set got no image batches")
    return feature_set


def key_digest(key: Mapping[str, Any]) -> str:
    """A short digest of a cache key (its canonical JSON), for a file name."""
    return hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:12]


def reference_cache_path(cache_dir: str | Path, dataset: str, split: str, count: int,
                         key: Mapping[str, Any] | None = None) -> Path:
    """``<cache_dir>/inception_<dataset>_<split>_<count>.npz``, with ``_<key_digest(key)>``
    before the suffix when a key is given."""
    suffix = f"_{key_digest(key)}" if key else ""
    return Path(cache_dir) / f"inception_{dataset}_{split}_{count}{suffix}.npz"


def _load_cached(path: Path, count: int, key: Mapping[str, Any]) -> FeatureSet | None:
    """The cached set at `path` if it is there, readable and of this key; else None (a damaged
    or foreign file is reported and then replaced: a cache never decides a result)."""
    if not path.is_file():
        return None
    try:
        cached = FeatureSet.load(path)
    except Exception as error:  # a torn or corrupted file: zip, missing arrays, shapes
        logger.warning("the cached reference statistics %s are unreadable (%s: %s); computing them again",
                       path, type(error).__name__, error)
        return None
    expected = json.loads(json.dumps(dict(key)))  # the JSON round trip of what is saved
    if cached.metadata != expected or cached.count != count or not np.all(np.isfinite(cached.stats.mean())):
        logger.warning("the cached reference statistics %s do not match what they are for (%s); computing them "
                       "again", path, "key differs" if cached.metadata != expected else "counts or values")
        return None
    return cached


class _ComputeLock:
    """An exclusive ``flock`` on ``<cache file>.lock`` while one process computes a missing
    reference set: a second process evaluating against the same reference waits (saying so),
    then loads the first one's file instead of computing it again. The OS drops the lock when
    its holder dies; the lock file itself is harmless and stays. Where no lock can be had (a
    read-only cache, a file system without locks) the computation goes on unlocked."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path.with_name(path.name + ".lock")
        self.enabled = enabled and fcntl is not None
        self._handle = None

    def __enter__(self) -> "_ComputeLock":
        if not self.enabled:
            return self
        try:
            handle = open(self.path, "a")
        except OSError as error:
            logger.info("no lock file %s (%s): computing unlocked", self.path, error.strerror)
            return self
        try:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.warning("waiting for another process that is computing %s", self.path.with_suffix(""))
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError as error:  # a file system without locks (some network mounts)
            handle.close()
            logger.info("no lock on %s (%s): a concurrent process may compute the same statistics",
                        self.path, error.strerror)
            return self
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()


def reference_stats(
    cache_dir: str | Path,
    *,
    dataset: str,
    split: str,
    count: int,
    images: Callable[[], ImageBatches],
    extractor: FeatureExtractor,
    kid_capacity: int = KID_RESERVOIR_SIZE,
    shard: tuple[int, int] = (0, 1),
    sum_arrays: ArraySum | None = None,
    write_cache: bool = True,
    key: Mapping[str, Any] | None = None,
    use_cache: bool = True,
) -> FeatureSet:
    """The reference `FeatureSet` of `count` images of `dataset`/`split`: loaded from the cache
    file if present, else computed from `images()` (called only then; it must yield exactly
    `count` uint8 images in batches) and written to the cache atomically.

    `key`: what else the statistics depend on (a digest of the pixels, the extractor's weights
    and preprocessing, ...), JSON-able; it names the file and is checked on load, so a cache
    shared by every run on a machine never serves statistics of other images or another
    network. A file that does not load or does not match is computed again and replaced; a
    cache that cannot be written leaves the result uncached (a warning). ``use_cache=False``
    neither reads nor writes (an extractor that cannot say what its features depend on).

    Split between processes: ``shard=(rank, world)`` extracts features of batches rank,
    rank + world, ... only, `sum_arrays` adds up the processes' `FeatureAccumulator` arrays
    and only the process with `write_cache` writes the file. The processes decide together
    (through `sum_arrays`) whether every one of them has the cached file; if any lacks it
    they all compute. A single process that misses takes a lock, looks again and computes
    (`_ComputeLock`), so concurrent evaluations compute a reference once.
    """
    key = dict(key or {})
    path = reference_cache_path(cache_dir, dataset, split, count, key)
    rank, world = shard
    cached = _load_cached(path, count, key) if use_cache else None
    if world > 1 and sum_arrays is not None:
        everyone = sum_arrays({"cached": np.asarray([int(cached is not None)], dtype=np.int64)})["cached"]
        cached = cached if int(everyone[0]) == world else None
    if cached is not None:
        return cached
    write = write_cache and use_cache
    with _ComputeLock(path, enabled=world == 1 and write):
        if world == 1 and write:  # another process may have written it while this one waited
            cached = _load_cached(path, count, key)
            if cached is not None:
                return cached
        feature_set = _compute_reference(dataset, split, count, images, extractor, kid_capacity, shard, sum_arrays)
        feature_set.metadata = key
        if write:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                feature_set.save(path)  # atomic: a failed write leaves no partial file
            except OSError as error:  # a full disk or a read-only cache: the result stands, uncached
                logger.warning("could not cache the reference statistics in %s (%s); this run goes on "
                               "without the cache", path, error.strerror or error)
    return feature_set


def _compute_reference(dataset, split, count, images, extractor, kid_capacity, shard, sum_arrays) -> FeatureSet:
    if count < 1:
        raise ValueError(f"reference statistics need count >= 1 images, got {count}")
    rank, world = shard
    accumulator, first_batch, position = None, None, 0
    for batch_index, batch in enumerate(images()):
        first_batch = batch if first_batch is None else first_batch
        if batch_index % world == rank and position + len(batch) <= count:
            features = extractor(batch)
            if accumulator is None:
                accumulator = FeatureAccumulator(count, features.shape[1], kid_capacity)
            accumulator.update(features, position)
        position += len(batch)
    if position != count:
        raise ValueError(f"reference images for {dataset}/{split} yielded {position} images, expected count={count}")
    if accumulator is None:  # more processes than batches: this one only needs the dimension
        accumulator = FeatureAccumulator(count, extractor(first_batch[:1]).shape[1], kid_capacity)
    if sum_arrays is not None:
        accumulator.load_arrays(sum_arrays(accumulator.to_arrays()))
    return accumulator.feature_set()


def compare_feature_sets(
    generated: FeatureSet,
    reference: FeatureSet,
    *,
    kid_subsets: int = KID_NUM_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> dict:
    """{"fid", "kid", "kid_std", "num_generated", "num_reference"} between two feature sets."""
    kid_mean, kid_std = kid(generated.reservoir.features, reference.reservoir.features,
                            num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    return {
        "fid": fid(generated.stats, reference.stats),
        "kid": kid_mean,
        "kid_std": kid_std,
        "num_generated": generated.count,
        "num_reference": reference.count,
    }


def read_images(source) -> torch.Tensor:
    """uint8 images [N, C, H, W] from an array or tensor of that shape, an ``.npz`` file with an
    ``images`` array (what ``--mode sample`` writes), or a folder of PNG files (sorted by name)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            from PIL import Image

            files = sorted(path.glob("*.png"))
            if not files:
                raise ValueError(f"{path} holds no .png images")
            arrays = [np.asarray(Image.open(file)) for file in files]
            arrays = [a[None] if a.ndim == 2 else a.transpose(2, 0, 1) for a in arrays]
            if len({a.shape for a in arrays}) != 1:
                raise ValueError(f"the images in {path} differ in size or channels")
            source = np.stack(arrays)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                if "images" not in arrays:
                    raise ValueError(f"{path} has no 'images' array (arrays: {', '.join(arrays.files)})")
                source = arrays["images"]
        else:
            raise ValueError(f"{path}: give a folder of .png images, an .npz with 'images', or an array")
    images = torch.as_tensor(np.asarray(source))
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    return images


def image_fid(images, reference, *, extractor: FeatureExtractor | None = None, batch_size: int = 100,
              seed: int = 0) -> dict:
    """FID and KID of ``images`` against ``reference`` (each anything ``read_images`` takes, or a
    ``FeatureSet`` for the reference): {"fid", "kid", "kid_std", "num_generated", "num_reference"}.

    ``extractor`` defaults to the standard TF Inception-v3 on the CPU. FID depends on the
    number of images: compare numbers measured at equal counts.
    """
    if extractor is None:
        from evaluation.inception import InceptionFeatures

        extractor = InceptionFeatures()

    def feature_set(source) -> FeatureSet:
        if isinstance(source, FeatureSet):
            return source
        pixels = read_images(source)
        return image_feature_set((pixels[i:i + batch_size] for i in range(0, len(pixels), batch_size)),
                                 extractor, seed=seed)

    return compare_feature_sets(feature_set(images), feature_set(reference), seed=seed)
