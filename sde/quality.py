"""Sample quality: FID, KID and classifier metrics of streamed samples, and the reference
statistics of the training images they are compared with (shared by eval and compare).

Samples go batch by batch through Inception (and the data set's classifier, if it has one)
into running statistics, so memory does not grow with the sample count. Under ``torchrun``
every rank takes its share of the batches and the statistics are summed with collectives
(``sde.distributed``), so the numbers do not depend on the number of processes.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sde import checkpoint, data, distributed, samplers
from sde.generation import generate
from sde.progress import bar as progress_bar

logger = logging.getLogger(__name__)

#: Samples kept for a grid picture.
GRID_IMAGES = 100


def classifier_metrics_for(config, device: torch.device):
    """Running classifier metrics for the configured data set's classifier (None if it has none)."""
    name = data.get_dataset(config.data.dataset).classifier
    if name is None:
        return None
    from evaluation import ClassifierMetrics, load_classifier

    return ClassifierMetrics(load_classifier(name=name, device=device), device=device)


def inception_for(config, device: torch.device):
    """The Inception-v3 feature extractor of FID, as ``config.eval`` points to it."""
    from evaluation import InceptionFeatures

    return InceptionFeatures(config.eval.inception_path or None, device=device)


def _uint8_batches(images_uint8: torch.Tensor, batch_size: int):
    for start in range(0, len(images_uint8), batch_size):
        yield images_uint8[start:start + batch_size]


#: The environment variable that moves the user cache (``eval.cache_dir`` takes precedence).
CACHE_ENV = "SDE_CACHE_DIR"


def cache_dir(config) -> Path:
    """Where reference statistics are cached, once per machine: ``eval.cache_dir`` if set, else
    ``$SDE_CACHE_DIR``, else ``$XDG_CACHE_HOME/score-sde-toolkit`` (``~/.cache/...``)."""
    if config.eval.cache_dir:
        return Path(config.eval.cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "score-sde-toolkit"


def check_cache_dir(config) -> None:
    """The cache folder exists (made if missing): a ValueError naming it and
    ``eval.cache_dir`` otherwise, before any work. A folder that exists but is read-only is
    accepted with a warning (statistics found there are used; new ones are not cached)."""
    directory = cache_dir(config)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"the reference-statistics cache {directory} cannot be created ({error.strerror}); "
                         f"set eval.cache_dir or ${CACHE_ENV} to a writable folder") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        logger.warning("the reference-statistics cache %s is read-only: statistics not found there are "
                       "computed and not kept (eval.cache_dir or $%s moves it)", directory, CACHE_ENV)


def reference_key(config, reference: torch.Tensor, inception) -> dict[str, Any] | None:
    """What reference statistics depend on: the images (their SHA-256 and count, named by data
    set and split) and the extractor (``cache_key()``: weights digest, preprocessing version,
    device). None for an extractor without ``cache_key``: what its features depend on is
    unknown, so its statistics are not cached."""
    if not hasattr(inception, "cache_key"):
        return None
    return {"dataset": config.data.dataset, "split": config.data.split, "count": len(reference),
            "pixels_sha256": hashlib.sha256(reference.numpy().tobytes()).hexdigest(), **inception.cache_key()}


def reference_features(config, inception, *, shard: tuple[int, int] = (0, 1)):
    """Inception statistics of the training split, computed once per machine (``cache_dir``).

    The cache key (``reference_key``) holds dataset, split, count, the SHA-256 of the pixels (a
    split that fell back to another set of images, such as offline MNIST, never reuses a wrong
    cache) and the extractor's own key, so every workdir, mode and process that evaluates
    against the same images shares one file. With ``shard=(rank, world)`` the ranks compute a
    missing cache together; the first rank of each machine (``LOCAL_RANK`` 0) writes it, so a
    multi-node run leaves it in every node's cache.
    """
    from evaluation import reference_cache_path, reference_stats

    reference, _ = data.evaluation_subset(*data.load_dataset(config),
                                          config.eval.reference_num_images, seed=config.seed)
    key = reference_key(config, reference, inception)
    directory = cache_dir(config)
    writer = int(os.environ.get("LOCAL_RANK", shard[0])) == 0  # one writer per machine
    if writer and os.access(directory, os.W_OK):
        checkpoint.remove_orphans(directory)  # temporary files of writers killed mid-write
    computed = []

    def batches():  # called only when the cache misses: the long stage, with its bar
        computed.append(time.perf_counter())
        with progress_bar(desc=f"reference Inception statistics ({config.data.split})", unit="img",
                          total=len(reference), disable=shard[0] != 0) as bar:
            for batch in _uint8_batches(reference, config.eval.batch_size):
                yield batch
                bar.update(len(batch))

    features = reference_stats(directory, dataset=config.data.dataset, split=config.data.split,
                               count=len(reference), images=batches, extractor=inception, shard=shard,
                               sum_arrays=distributed.all_reduce_arrays, write_cache=writer,
                               key=key, use_cache=key is not None)
    if shard[0] == 0:
        path = reference_cache_path(directory, config.data.dataset, config.data.split, len(reference), key)
        where = (f"cached in {directory}" if key is not None and path.is_file()
                 else "not cached (see the warning)" if key is not None else "not cached (no extractor key)")
        print(f"reference statistics: {len(reference):,} {config.data.dataset} {config.data.split} images, "
              + (f"computed in {time.perf_counter() - computed[0]:.0f} s, {where}" if computed
                 else f"from the cache in {directory}"), flush=True)
    return features


def sample_quality(config, model, sde, device, *, method: str, steps: int, options: dict,
                   num_samples: int, inception, reference, classifier=None,
                   progress: bool = True, shard: tuple[int, int] = (0, 1), labels: torch.Tensor | None = None,
                   guidance: float = 0.0) -> tuple[dict[str, Any], np.ndarray]:
    """FID/KID (and classifier metrics on MNIST) of ``num_samples`` streamed samples.

    A class-conditional model draws sample k of class ``labels[k]`` with classifier-free
    guidance ``guidance`` (``sde.conditioning``); the classifier then also scores each
    sample against the class it was drawn for (accuracy, confusion matrix).

    Samples go batch by batch through Inception (and the classifier) into running
    statistics; only the first ``GRID_IMAGES`` are kept, for a grid. With
    ``shard=(rank, world)`` this process does batches rank, rank + world, ...; every rank
    returns the metrics of all samples. Returns (metrics, grid images).
    """
    from evaluation import compare_feature_sets
    from evaluation.fid import FeatureAccumulator

    features = FeatureAccumulator(num_samples, reference.stats.dim)
    grid = torch.zeros(data.sample_shape(config, min(GRID_IMAGES, num_samples)), dtype=torch.uint8)
    batch_size = config.sampling.batch_size
    batch_nfe = torch.zeros(math.ceil(num_samples / batch_size), dtype=torch.int64)
    start = time.perf_counter()
    sampling_time = 0.0
    batch_start = time.perf_counter()
    for first, x, info in generate(config, model, sde, device, num_samples=num_samples,
                                   seed=config.sampling.seed, method=method, steps=steps,
                                   options=options, shard=shard, progress=progress, labels=labels,
                                   guidance=guidance):
        sampling_time += time.perf_counter() - batch_start
        batch_nfe[first // batch_size] = info["nfe"]
        batch = data.float_to_uint8(x.float().cpu(), dequantized=config.data.dequantize)
        features.update(inception(batch), first)
        if classifier is not None:
            classifier.update(batch, None if labels is None else labels[first:first + len(batch)])
        grid[first:first + len(batch)] = batch[:max(len(grid) - first, 0)]
        batch_start = time.perf_counter()
    features.load_arrays(distributed.all_reduce_arrays(features.to_arrays()))
    if classifier is not None:
        classifier.load_arrays(distributed.all_reduce_arrays(classifier.to_arrays()))
    metrics = {"sampler": method, "steps": steps, "options": options,
               "resolved_options": samplers.reported_options(method, sde, options),
               "nfe": int(distributed.sum_over_ranks(batch_nfe)[-1]),  # the last batch's, as sampled
               "num_samples": num_samples, "processes": shard[1], "sampling_time_s": sampling_time,
               **({} if labels is None else {"guidance": guidance, "label_counts": torch.bincount(labels).tolist()}),
               "wall_time_s": time.perf_counter() - start}
    metrics.update(compare_feature_sets(features.feature_set(), reference, seed=config.sampling.seed))
    if classifier is not None:
        metrics["classifier"] = classifier.result()
    if progress:
        print(f"samples: {num_samples:,} in {metrics['wall_time_s']:.0f} s ({method}, {metrics['nfe']} NFE); "
              f"FID {metrics['fid']:.3f}", flush=True)
    return metrics, distributed.sum_over_ranks(grid).numpy()
