"""Tests of sde/data.py: IDX and CIFAR-10 parsing, MD5 / download / fallback order, the
restricted unpickler, pixel scaling, toy sets against their closed forms, BatchStream.

No test touches the network: every test either sets download=False or passes a fake fetch.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import struct
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate

from configs.default import get_default_config
from sde import data

EMBEDDED_MNIST = Path(data.__file__).parents[1] / "assets" / "mnist"
MNIST_TEST_SIZE = 10_000
CIFAR_PIXELS = data.CIFAR10_NUM_CHANNELS * data.CIFAR10_IMAGE_SIZE ** 2


# ---- builders of small files -------------------------------------------------------------
def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """IDX encoding of a uint8 array: magic (type 0x08, ndim), big-endian sizes, data."""
    magic = (data.IDX_UBYTE_TYPE_CODE << 8) | array.ndim if magic is None else magic
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", size) for size in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(directory: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    image_name, label_name = data.MNIST_SPLIT_FILES[split]
    (directory / image_name).write_bytes(gzip.compress(idx_bytes(images)))
    (directory / label_name).write_bytes(gzip.compress(idx_bytes(labels)))


def small_mnist(num_images: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_images, 28, 28), dtype=np.uint8)
    labels = np.arange(num_images, dtype=np.uint8) % data.NUM_CLASSES
    return images, labels


class Python2Pickler(pickle._Pickler):
    """Writes ``str`` and ``bytes`` as Python 2 ``str`` opcodes (SHORT_BINSTRING /
    BINSTRING), the way cPickle wrote the published CIFAR-10 batches, so the files
    load only with ``encoding="bytes"`` and name no ``_codecs`` global."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj: str | bytes) -> None:
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = save_python2_str
    dispatch[bytes] = save_python2_str


def python2_pickle(obj: object) -> bytes:
    stream = io.BytesIO()
    Python2Pickler(stream, protocol=2).dump(obj)
    # numpy 1.x (and the published files) name numpy.core; numpy 2.x names numpy._core
    return stream.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def cifar_batch(num_images: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (num_images, CIFAR_PIXELS), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, data.NUM_CLASSES, num_images)]
    return pixels, labels


def write_cifar(directory: Path, images_per_batch: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    batch_dir = directory / data.CIFAR10_DIR
    batch_dir.mkdir(parents=True, exist_ok=True)
    contents = {}
    for seed, name in enumerate(data.CIFAR10_SPLIT_FILES["train"] + data.CIFAR10_SPLIT_FILES["test"]):
        pixels, labels = cifar_batch(images_per_batch, seed)
        batch = {b"batch_label": b"batch " + name.encode(), b"labels": labels, b"data": pixels,
                 b"filenames": [b"img%d.png" % i for i in range(images_per_batch)]}
        (batch_dir / name).write_bytes(python2_pickle(batch))
        contents[name] = (pixels, labels)
    return contents


def mnist_config(data_dir: Path, **overrides):
    config = get_default_config()
    config.data.data_dir = str(data_dir)
    config.data.download = False
    for key, value in overrides.items():
        setattr(config.data, key, value)
    return config


def no_network(url: str, destination: Path, timeout_s: float) -> None:
    raise AssertionError(f"a test tried to download {url}")


# ---- IDX / MNIST -------------------------------------------------------------------------
def test_read_idx_round_trips_images_and_labels(tmp_path):
    images, labels = small_mnist()
    write_mnist(tmp_path, "train", images, labels)
    got_images, got_labels = data.load_mnist(tmp_path, "train", download=False, checksums={})
    assert got_images.dtype == torch.uint8 and got_images.shape == (6, 1, 28, 28)
    np.testing.assert_array_equal(got_images[:, 0].numpy(), images)
    assert got_labels.dtype == torch.int64
    np.testing.assert_array_equal(got_labels.numpy(), labels)


def test_read_idx_reads_uncompressed_files(tmp_path):
    labels = np.array([3, 1, 4], dtype=np.uint8)
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(idx_bytes(labels))
    np.testing.assert_array_equal(data.read_idx(path, expected_magic=data.IDX_LABELS_MAGIC), labels)


def test_idx_magic_numbers_are_the_published_ones():
    assert (data.IDX_IMAGES_MAGIC, data.IDX_LABELS_MAGIC) == (2051, 2049)


def test_wrong_magic_number_is_an_error_naming_the_file(tmp_path):
    images, labels = small_mnist()
    image_name, label_name = data.MNIST_SPLIT_FILES["train"]
    (tmp_path / image_name).write_bytes(gzip.compress(idx_bytes(images, magic=data.IDX_LABELS_MAGIC)))
    (tmp_path / label_name).write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(ValueError, match=f"{image_name}.*magic number 2049, expected 2051"):
        data.load_mnist(tmp_path, "train", download=False, checksums={})


@pytest.mark.parametrize("change", ["truncated", "extra_byte", "short_header"])
def test_size_mismatch_is_an_error_naming_the_file(tmp_path, change):
    images, labels = small_mnist()
    image_name, label_name = data.MNIST_SPLIT_FILES["train"]
    content = idx_bytes(images)
    content = {"truncated": content[:-1], "extra_byte": content + b"\0", "short_header": content[:10]}[change]
    (tmp_path / image_name).write_bytes(gzip.compress(content))
    (tmp_path / label_name).write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(ValueError, match=image_name):
        data.load_mnist(tmp_path, "train", download=False, checksums={})


def test_image_and_label_counts_must_agree(tmp_path):
    images, labels = small_mnist()
    write_mnist(tmp_path, "train", images, labels[:-1])
    with pytest.raises(ValueError, match="6 images but .* 5 labels"):
        data.load_mnist(tmp_path, "train", download=False, checksums={})


def test_md5_mismatch_is_an_error_not_a_fallback(tmp_path):
    images, labels = small_mnist()
    write_mnist(tmp_path, "test", images, labels)  # valid IDX, but not the published file
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # falling back to the embedded copy would warn
        with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: MD5 .* published 9fb629c4"):
            data.load_mnist(tmp_path, "test", download=True, fetch=no_network)


def test_corrupt_present_file_is_an_error_even_when_its_partner_is_missing(tmp_path):
    images, _ = small_mnist()
    (tmp_path / data.MNIST_SPLIT_FILES["train"][0]).write_bytes(gzip.compress(idx_bytes(images)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="MD5"):
            data.load_mnist(tmp_path, "train", download=False)


def test_not_gzip_is_an_error_naming_the_file(tmp_path):
    image_name = data.MNIST_SPLIT_FILES["train"][0]
    (tmp_path / image_name).write_bytes(b"definitely not gzip")
    with pytest.raises(ValueError, match=f"{image_name}: not a valid gzip"):
        data.read_idx(tmp_path / image_name, expected_magic=data.IDX_IMAGES_MAGIC)


def test_embedded_copies_are_the_published_files():
    for split in data.MNIST_EMBEDDED_SPLITS:
        for name in data.MNIST_SPLIT_FILES[split]:
            assert hashlib.md5((EMBEDDED_MNIST / name).read_bytes()).hexdigest() == data.MNIST_MD5[name]
    assert data.MNIST_MD5["t10k-images-idx3-ubyte.gz"] == "9fb629c4189551a2d022fa330f9573f3"
    assert data.MNIST_MD5["t10k-labels-idx1-ubyte.gz"] == "ec29112dd5afa0611ce80d1b7f02629c"
    assert data.MNIST_MD5["train5k-images-idx3-ubyte.gz"] == "6057ca5a67cd8660e9946050476aec42"
    assert data.MNIST_MD5["train5k-labels-idx1-ubyte.gz"] == "f4e4f8640ad2a3b028472f5598c37e79"


def test_embedded_splits_load_with_no_files_no_network_and_no_warning(tmp_path):
    """A clone with nothing beside it has the MNIST-10k protocol's two splits: t10k (train
    on it) and train5k (held out), read from the package and checked against their MD5s."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        test_images, test_labels = data.load_mnist(tmp_path, "test", download=True, fetch=no_network)
        heldout_images, heldout_labels = data.load_mnist(tmp_path, "train5k", download=True, fetch=no_network)
    assert test_images.shape == (MNIST_TEST_SIZE, 1, 28, 28) and test_labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert heldout_images.shape == (5000, 1, 28, 28)
    assert torch.bincount(heldout_labels).tolist() == [500] * 10  # 500 per class, sorted by class
    assert heldout_labels[:500].eq(0).all() and heldout_labels[-500:].eq(9).all()
    # held out: no train5k image is one of the test split's (which the release trains on)
    test_rows = {bytes(row) for row in test_images.flatten(1).numpy()}
    assert not any(bytes(row) in test_rows for row in heldout_images.flatten(1).numpy())
    assert list(tmp_path.iterdir()) == []


def test_missing_files_without_download_fall_back_to_embedded_test_split_with_warning(tmp_path):
    with pytest.warns(data.EmbeddedMNISTWarning) as record:
        images, labels = data.load_mnist(tmp_path, "train", download=False, fetch=no_network)
    message = str(record[0].message)
    assert "'train'" in message and str(tmp_path) in message and "embedded" in message and "'test'" in message
    assert images.shape == (MNIST_TEST_SIZE, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (MNIST_TEST_SIZE,)
    # the first labels of the official test split are 7 2 1 0 4
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert torch.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_failed_download_falls_back_with_warning_and_leaves_no_partial_files(tmp_path):
    tried = []

    def broken_fetch(url: str, destination: Path, timeout_s: float) -> None:
        tried.append((url, timeout_s))
        destination.write_bytes(b"half a file")  # then the connection drops
        raise OSError("connection reset")

    with pytest.warns(data.EmbeddedMNISTWarning, match="download failed.*connection reset"):
        images, _ = data.load_mnist(tmp_path / "fresh", "train", download=True, fetch=broken_fetch)
    assert len(images) == MNIST_TEST_SIZE
    urls = [url for url, _ in tried]
    assert urls[:2] == [mirror + "train-images-idx3-ubyte.gz" for mirror in data.MNIST_MIRRORS]
    assert any("ossci-datasets" in url for url in urls) and any("yann.lecun.com" in url for url in urls)
    assert all(timeout <= 10 for _, timeout in tried)
    assert not (tmp_path / "fresh").exists()  # no partial file, and no folder it created


def test_downloaded_file_with_wrong_md5_is_discarded(tmp_path):
    def wrong_file(url: str, destination: Path, timeout_s: float) -> None:
        destination.write_bytes(gzip.compress(idx_bytes(np.zeros(3, np.uint8))))

    with pytest.warns(data.EmbeddedMNISTWarning, match="MD5"):
        data.load_mnist(tmp_path, "train", download=True, fetch=wrong_file)
    assert list(tmp_path.iterdir()) == []


def test_successful_download_is_used_without_warning(tmp_path):
    images, labels = small_mnist()
    served = {name: gzip.compress(idx_bytes(array))
              for name, array in zip(data.MNIST_SPLIT_FILES["train"], (images, labels))}
    checksums = {name: hashlib.md5(content).hexdigest() for name, content in served.items()}

    def serve(url: str, destination: Path, timeout_s: float) -> None:
        destination.write_bytes(served[url.rsplit("/", 1)[1]])

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got_images, got_labels = data.load_mnist(tmp_path, "train", download=True, checksums=checksums, fetch=serve)
    np.testing.assert_array_equal(got_images[:, 0].numpy(), images)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(served)


def test_a_corrupt_local_train5k_is_an_error_not_replaced_by_the_embedded_copy(tmp_path):
    images, labels = small_mnist()
    write_mnist(tmp_path, "train5k", images, labels)  # valid IDX, but not the published file
    with pytest.raises(ValueError, match="train5k-images-idx3-ubyte.gz: MD5"):
        data.load_mnist(tmp_path, "train5k", download=True, fetch=no_network)


def test_load_dataset_reads_local_files_and_filters_classes(tmp_path):
    for name in data.MNIST_SPLIT_FILES["test"]:
        (tmp_path / name).write_bytes((EMBEDDED_MNIST / name).read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        all_images, all_labels = data.load_dataset(mnist_config(tmp_path), "test")
        images, labels = data.load_dataset(mnist_config(tmp_path, classes=(3, 8)), "test")
    keep = (all_labels == 3) | (all_labels == 8)
    assert set(labels.tolist()) == {3, 8} and len(labels) == int(keep.sum())
    assert torch.equal(images, all_images[keep])


# ---- CIFAR-10 and the restricted unpickler -----------------------------------------------
def test_cifar10_batches_parse_into_nchw(tmp_path):
    contents = write_cifar(tmp_path)
    images, labels = data.load_cifar10(tmp_path, "train", download=False, checksums={})
    assert images.shape == (15, 3, 32, 32) and images.dtype == torch.uint8
    pixels, batch_labels = contents["data_batch_2"]
    # row layout: 1024 red, then green, then blue, each 32x32 row-major
    np.testing.assert_array_equal(images[3:6].numpy(), pixels.reshape(3, 3, 32, 32))
    assert images[3, 1, 0, 0] == pixels[0, 1024] and images[3, 2, 1, 2] == pixels[0, 2048 + 32 + 2]
    assert labels[3:6].tolist() == batch_labels
    test_images, test_labels = data.load_cifar10(tmp_path, "test", download=False, checksums={})
    np.testing.assert_array_equal(test_images.reshape(3, -1).numpy(), contents["test_batch"][0])
    assert test_labels.tolist() == contents["test_batch"][1]


def test_test_pickles_are_faithful_to_the_published_format():
    import pickletools
    globals_named = {arg for op, arg, _ in pickletools.genops(python2_pickle(cifar_batch(2, 0)[0]))
                     if op.name == "GLOBAL"}
    assert globals_named == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}


def test_cifar10_class_filter_through_load_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(data.cifar10, "CIFAR10_MD5", {})
    write_cifar(tmp_path, images_per_batch=20)
    config = mnist_config(tmp_path, dataset="cifar10", image_size=32, num_channels=3)
    all_images, all_labels = data.load_dataset(config, "train")
    config.data.classes = (0,)
    images, labels = data.load_dataset(config, "train")
    assert len(labels) == int((all_labels == 0).sum()) > 0 and set(labels.tolist()) == {0}
    assert torch.equal(images, all_images[all_labels == 0])


def test_cifar10_md5_mismatch_is_an_error(tmp_path):
    write_cifar(tmp_path)
    with pytest.raises(ValueError, match="data_batch_1: MD5 .* published c99cafc1"):
        data.load_cifar10(tmp_path, "train", download=False)


def test_cifar10_missing_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="test_batch not found.*download disabled.*cifar-10-python.tar.gz"):
        data.load_cifar10(tmp_path, "test", download=False, fetch=no_network)


def test_cifar10_download_extracts_the_archive(tmp_path):
    source = tmp_path / "source"
    contents = write_cifar(source)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(source / data.CIFAR10_DIR, arcname=data.CIFAR10_DIR)
    archive_bytes = archive.getvalue()
    tried = []

    def serve(url: str, destination: Path, timeout_s: float) -> None:
        tried.append(url)
        destination.write_bytes(archive_bytes)

    target = tmp_path / "target"
    checksums = {data.CIFAR10_ARCHIVE: hashlib.md5(archive_bytes).hexdigest()}
    _, labels = data.load_cifar10(target, "test", download=True, checksums=checksums, fetch=serve)
    assert tried == [data.CIFAR10_URL] == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert labels.tolist() == contents["test_batch"][1]
    assert (target / data.CIFAR10_DIR / "test_batch").is_file()
    assert not any(p.name.endswith(".part") for p in target.rglob("*"))


def test_cifar10_failed_download_is_a_clear_error(tmp_path):
    def offline(url: str, destination: Path, timeout_s: float) -> None:
        raise OSError("Name or service not known")

    with pytest.raises(FileNotFoundError, match="download failed.*Name or service not known"):
        data.load_cifar10(tmp_path, "train", download=True, fetch=offline)
    assert list(tmp_path.iterdir()) == []


class RunsShell:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class CallsEval:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (eval, (f"open({self.command.split()[-1]!r}, 'w')",))


@pytest.mark.parametrize("payload", [RunsShell, CallsEval])
def test_pickle_carrying_a_callable_is_refused_before_it_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    malicious = {b"data": payload(f"touch {marker}"), b"labels": [0]}
    for content in (python2_pickle(malicious), pickle.dumps(malicious, protocol=pickle.HIGHEST_PROTOCOL)):
        path = tmp_path / "data_batch_1"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=r"refused global (posix|nt|builtins|__builtin__)\.(system|eval)"):
            data.read_cifar10_batch(path)
        assert not marker.exists()


def test_object_arrays_are_refused(tmp_path):
    path = tmp_path / "test_batch"
    path.write_bytes(python2_pickle({b"data": np.array([1, "x"], dtype=object), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match="refused numpy dtype object"):
        data.read_cifar10_batch(path)


def test_malformed_cifar_batch_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "test_batch"
    path.write_bytes(python2_pickle({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=f"{path}: b'data' must be a uint8 array"):
        data.read_cifar10_batch(path)


# ---- config validation --------------------------------------------------------------------
def test_image_shape_mismatch_names_both_values(tmp_path):
    with pytest.raises(ValueError, match="28x28 with 1 channel.*image_size=32, num_channels=3"):
        data.load_dataset(mnist_config(tmp_path, image_size=32, num_channels=3))


def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; valid: cifar10, mnist, toy"):
        data.load_dataset(mnist_config(tmp_path, dataset="imagenet"))


def test_random_flip_is_refused_for_mnist(tmp_path):
    with pytest.raises(ValueError, match="random_flip is refused for mnist"):
        data.load_dataset(mnist_config(tmp_path, random_flip=True))


@pytest.mark.parametrize("overrides, message", [
    ({"split": "validation"}, "unknown mnist split 'validation'"),
    ({"classes": (10,)}, "classes must be ints in 0..9"),
    ({"dataset": "toy", "toy_name": "moons"}, "unknown toy set 'moons'"),
    ({"dataset": "toy", "dequantize": True}, "dequantize applies to 8-bit images"),
])
def test_other_bad_configs_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        data.load_dataset(mnist_config(tmp_path, **overrides))


# ---- scaling ------------------------------------------------------------------------------
ALL_PIXELS = torch.arange(data.NUM_PIXEL_LEVELS, dtype=torch.int64).to(torch.uint8)


def test_plain_scaling_maps_0_and_255_to_the_interval_ends_and_inverts_exactly():
    x = data.uint8_to_float(ALL_PIXELS, dequantize=False)
    assert x.dtype == torch.float32 and x[0] == -1 and x[-1] == 1
    assert (x.double() - ALL_PIXELS.double() / 255 * 2 + 1).abs().max() < 1e-6
    assert torch.equal(data.float_to_uint8(x, dequantized=False), ALL_PIXELS)


def test_dequantized_scaling_stays_in_its_bin_and_inverts_exactly():
    generator = torch.Generator().manual_seed(0)
    pixels = ALL_PIXELS.repeat(64)
    x = data.uint8_to_float(pixels, dequantize=True, generator=generator)
    low = pixels.float() / 128 - 1
    assert (x >= low).all() and (x < low + 2 / 256).all()
    assert x.min() >= -1 and x.max() < 1
    assert torch.equal(data.float_to_uint8(x, dequantized=True), pixels)


def test_dequantization_noise_is_uniform_over_the_bin():
    pixel_value, num_pixels = 100, 200_000
    pixels = torch.full((num_pixels,), pixel_value, dtype=torch.uint8)
    x = data.uint8_to_float(pixels, dequantize=True, generator=torch.Generator().manual_seed(1)).double()
    bin_width = 2 / data.NUM_PIXEL_LEVELS
    # x = (u + v) / 128 - 1 with v ~ U[0, 1): mean (u + 1/2) / 128 - 1, variance bin_width^2 / 12
    expected_mean, expected_var = (pixel_value + 0.5) * bin_width - 1, bin_width ** 2 / 12
    assert abs(x.mean() - expected_mean) < 5 * math.sqrt(expected_var / num_pixels)
    assert abs(x.var() / expected_var - 1) < 0.02
    histogram = torch.histc((x - (pixel_value * bin_width - 1)) / bin_width, bins=10, min=0, max=1)
    assert (histogram / num_pixels - 0.1).abs().max() < 0.005


def test_inverse_clips_out_of_range_samples():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 4.0])
    assert data.float_to_uint8(x, dequantized=False).tolist() == [0, 0, 128, 255, 255]
    assert data.float_to_uint8(x, dequantized=True).tolist() == [0, 0, 128, 255, 255]


# ---- toy sets -----------------------------------------------------------------------------
TOY_SAMPLES = 40_000


def mixture_moments(mixture: data.GaussianMixture) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean sum_k w_k mu_k and covariance sum_k w_k (Sigma_k + mu_k mu_k^T) - mean mean^T."""
    w, mu, cov = mixture.weights, mixture.means, mixture.covariances
    mean = (w[:, None] * mu).sum(0)
    second = (w[:, None, None] * (cov + mu[:, :, None] * mu[:, None, :])).sum(0)
    return mean, second - torch.outer(mean, mean)


def assert_moments(points: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> None:
    points = points.double()
    n = len(points)
    mean_tolerance = 5 * torch.sqrt(torch.diagonal(cov) / n)
    assert ((points.mean(0) - mean).abs() < mean_tolerance).all(), (points.mean(0), mean)
    # Var of a sample covariance entry is about (cov_ii cov_jj + cov_ij^2) / n for a Gaussian
    # (larger for mixtures; 8 standard errors covers that)
    cov_tolerance = 8 * torch.sqrt((torch.outer(torch.diagonal(cov), torch.diagonal(cov)) + cov ** 2) / n)
    assert ((torch.cov(points.T) - cov).abs() < cov_tolerance).all(), (torch.cov(points.T), cov)


def test_gaussian_toy_set_matches_its_documented_parameters(tmp_path):
    mixture = data.toy_mixture("gaussian")
    assert mixture.means.tolist() == [list(data.GAUSSIAN_MEAN)]
    assert mixture.covariances.tolist() == [[list(row) for row in data.GAUSSIAN_COV]]
    config = mnist_config(tmp_path, dataset="toy", toy_name="gaussian", toy_num_samples=TOY_SAMPLES)
    points, labels = data.load_dataset(config)
    assert labels is None and points.shape == (TOY_SAMPLES, 2) and points.dtype == torch.float32
    assert_moments(points, mixture.means[0], mixture.covariances[0])


def test_two_gaussians_toy_set_matches_its_mixture(tmp_path):
    mixture = data.toy_mixture("two_gaussians")
    assert mixture.weights.tolist() == list(data.TWO_GAUSSIANS_WEIGHTS)
    config = mnist_config(tmp_path, dataset="toy", toy_name="two_gaussians", toy_num_samples=TOY_SAMPLES)
    points, _ = data.load_dataset(config)
    assert_moments(points, *mixture_moments(mixture))
    # the components are far apart: the nearest mean identifies each point's component
    component = torch.cdist(points.double(), mixture.means).argmin(1)
    fractions = torch.bincount(component, minlength=2).double() / TOY_SAMPLES
    weight_tolerance = 5 * math.sqrt(0.25 / TOY_SAMPLES)
    assert ((fractions - mixture.weights).abs() < weight_tolerance).all()
    for k in range(2):
        assert_moments(points[component == k], mixture.means[k], mixture.covariances[k])


def test_spiral_matches_its_construction(tmp_path):
    config = mnist_config(tmp_path, dataset="toy", toy_name="spiral", toy_num_samples=TOY_SAMPLES)
    points, _ = data.load_dataset(config)
    points = points.double()
    # radius sqrt(w) with w ~ U(0,1) has density 2r on [0, 1]; angle = 2 pi turns r
    turns = data.SPIRAL_TURNS
    expected_mean = [integrate.quad(lambda r: 2 * r * r * trig(2 * math.pi * turns * r), 0, 1)[0]
                     for trig in (math.cos, math.sin)]
    expected_sq_norm = 0.5 + 2 * data.SPIRAL_NOISE_STD ** 2  # E[r^2] + E|noise|^2
    assert (points.mean(0) - torch.tensor(expected_mean, dtype=torch.float64)).abs().max() < 5 * math.sqrt(
        0.5 / TOY_SAMPLES)
    assert abs(points.pow(2).sum(1).mean() - expected_sq_norm) < 5 * math.sqrt(1 / 12 / TOY_SAMPLES)
    with pytest.raises(ValueError, match="no closed-form"):
        data.toy_mixture("spiral")


def test_toy_sets_are_functions_of_seed_and_split(tmp_path):
    config = mnist_config(tmp_path, dataset="toy", toy_name="gaussian", toy_num_samples=100)
    first, _ = data.load_dataset(config, "train")
    again, _ = data.load_dataset(config, "train")
    held_out, _ = data.load_dataset(config, "test")
    config.seed = 1
    other_seed, _ = data.load_dataset(config, "train")
    assert torch.equal(first, again)
    assert not torch.equal(first, held_out) and not torch.equal(first, other_seed)


# ---- BatchStream --------------------------------------------------------------------------
def index_data(num_examples: int) -> torch.Tensor:
    """Float 'images' whose only value is their own index, so a batch names its rows."""
    return torch.arange(num_examples, dtype=torch.float32)[:, None]


def batch_indices(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].long().tolist()


def pixel_images(num_examples: int) -> torch.Tensor:
    """uint8 images [N, 1, 2, 3] with distinct pixels, so flips and noise are visible."""
    base = torch.arange(num_examples * 6).reshape(num_examples, 1, 2, 3)
    return (base % 251).to(torch.uint8)


def test_each_epoch_is_a_permutation_and_epochs_differ():
    stream = data.BatchStream(index_data(12), batch_size=4, seed=3)
    epochs = [sum((batch_indices(next(stream)) for _ in range(3)), []) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12))
    assert epochs[0] != epochs[1]
    assert stream.state_dict()["epoch"] == 1


def test_remainder_of_an_epoch_is_dropped():
    stream = data.BatchStream(index_data(10), batch_size=4, seed=0)
    assert stream.batches_per_epoch == 2
    first_epoch = [batch_indices(next(stream)) for _ in range(2)]
    next(stream)
    assert stream.state_dict()["epoch"] == 1 and stream.state_dict()["position"] == 4
    assert len(set(sum(first_epoch, []))) == 8


def test_streams_are_deterministic_in_the_seed():
    images = pixel_images(20)
    make = lambda seed: data.BatchStream(images, 5, seed, dequantize=True)  # noqa: E731
    a, b, c = make(7), make(7), make(8)
    for _ in range(6):
        batch_a, batch_b, batch_c = next(a), next(b), next(c)
        assert torch.equal(batch_a, batch_b) and not torch.equal(batch_a, batch_c)


@pytest.mark.parametrize("dequantize, random_flip", [(False, False), (True, True)])
def test_resume_mid_epoch_is_bit_exact(dequantize, random_flip):
    images, labels = pixel_images(10), torch.arange(10)
    make = lambda: data.BatchStream(images, 3, seed=5, labels=labels, dequantize=dequantize,  # noqa: E731
                                    random_flip=random_flip)
    original = make()
    for _ in range(4):  # 3 batches per epoch: stop one batch into epoch 1
        next(original)
    state = original.state_dict()
    assert state["epoch"] == 1 and state["position"] == 3
    assert all(isinstance(value, int) for value in state.values())
    expected = [next(original) for _ in range(7)]
    resumed = make()
    resumed.load_state_dict(state)
    for (x_expected, y_expected), (x, y) in zip(expected, (next(resumed) for _ in range(7))):
        assert torch.equal(x, x_expected) and torch.equal(y, y_expected)


def test_flips_mirror_whole_images_horizontally():
    images = pixel_images(64)
    stream = data.BatchStream(images, 64, seed=0, labels=torch.arange(64), random_flip=True)
    x, index = next(stream)
    plain = data.uint8_to_float(images[index], dequantize=False)
    flipped = torch.tensor([torch.equal(x[i], plain[i].flip(-1)) for i in range(64)])
    unchanged = torch.tensor([torch.equal(x[i], plain[i]) for i in range(64)])
    assert (flipped | unchanged).all() and 16 < int(flipped.sum()) < 48


def test_dequantized_batches_stay_in_the_pixel_bins():
    images = pixel_images(16)
    stream = data.BatchStream(images, 16, seed=2, labels=torch.arange(16), dequantize=True)
    x, index = next(stream)
    assert torch.equal(data.float_to_uint8(x, dequantized=True), images[index])
    assert not torch.equal(x, data.uint8_to_float(images[index], dequantize=False))


def test_every_batch_draws_fresh_noise():
    constant = torch.zeros(8, 1, 4, 4, dtype=torch.uint8)
    stream = data.BatchStream(constant, 4, seed=0, dequantize=True)
    batches = [next(stream) for _ in range(4)]  # two epochs of two batches
    noise = [batch.flatten() for batch in batches]
    assert all(not torch.equal(noise[i], noise[j]) for i in range(4) for j in range(i + 1, 4))


def test_shards_are_disjoint_and_cover_the_global_batch_bit_for_bit():
    images, labels, world_size = pixel_images(24), torch.arange(24), 4
    make = lambda rank, size: data.BatchStream(images, 8, seed=9, labels=labels, dequantize=True,  # noqa: E731
                                               random_flip=True, rank=rank, world_size=size)
    single = make(0, 1)
    ranks = [make(rank, world_size) for rank in range(world_size)]
    for _ in range(5):  # crosses an epoch boundary (3 batches per epoch)
        x_global, y_global = next(single)
        shards = [next(stream) for stream in ranks]
        assert all(len(y) == 2 for _, y in shards)
        shard_labels = [set(y.tolist()) for _, y in shards]
        assert all(a.isdisjoint(b) for i, a in enumerate(shard_labels) for b in shard_labels[i + 1:])
        assert torch.equal(torch.cat([x for x, _ in shards]), x_global)
        assert torch.equal(torch.cat([y for _, y in shards]), y_global)


def test_stream_argument_errors():
    with pytest.raises(ValueError, match="batch_size 10 must be divisible by world_size 4"):
        data.BatchStream(index_data(20), 10, seed=0, world_size=4)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        data.BatchStream(index_data(20), 10, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be in 1..20"):
        data.BatchStream(index_data(20), 21, seed=0)
    with pytest.raises(ValueError, match="dequantize needs uint8"):
        data.BatchStream(index_data(20), 4, seed=0, dequantize=True)
    stream = data.BatchStream(index_data(20), 4, seed=0)
    with pytest.raises(ValueError, match="seed=1 over 20"):
        stream.load_state_dict({**stream.state_dict(), "seed": 1})


def test_create_batch_stream_follows_the_config(tmp_path):
    config = mnist_config(tmp_path, dataset="toy", toy_name="gaussian", toy_num_samples=64)
    config.training.batch_size = 16
    stream = data.create_batch_stream(config, rank=1, world_size=2)
    points, _ = data.load_dataset(config)
    batch = next(stream)
    assert batch.shape == (8, 2)
    # every row is one of the data points
    assert (torch.cdist(batch, points).min(1).values == 0).all()


def test_the_prefetcher_reads_ahead_and_resumes_at_the_batch_not_yet_taken():
    images = torch.arange(10 * 4, dtype=torch.uint8).reshape(10, 1, 2, 2)
    stream = data.BatchStream(images, batch_size=3, seed=1)
    batches = data.DevicePrefetcher(stream, "cpu")
    first = batches.take()
    batches.prefetch()  # the next batch is read: the stream has moved past it
    assert stream.state_dict()["position"] == 6 and batches.state_dict()["position"] == 3
    resumed = data.BatchStream(images, batch_size=3, seed=1)
    resumed.load_state_dict(batches.state_dict())
    assert torch.equal(next(resumed), batches.take())
    assert not torch.equal(first, next(resumed))
