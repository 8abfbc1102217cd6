"""MNIST (LeCun, Cortes & Burges; IDX files): the official splits and the benchmark's train5k.

The official test split (t10k) and the held-out ``train5k`` split (500 images per class of
the training split, sorted by class, none of them in t10k) ship inside the package
(``sde/assets/mnist``), byte for byte the files whose MD5s are listed below, so that a clone
with no data and no internet trains and evaluates on the MNIST-10k protocol: train on t10k,
measure held-out bits/dim on train5k. The 60k training split is downloaded (MD5 checked)
when it is asked for.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import math
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import ml_collections
import numpy as np
import torch

from sde.data.datasets import NUM_CLASSES, Dataset, check_image_config, register
from sde.data.files import Fetch, check_md5, download_file, fetch_url

if TYPE_CHECKING:  # Python >= 3.11 location; annotations only
    from importlib.resources.abc import Traversable

Tensor = torch.Tensor

MNIST_IMAGE_SIZE, MNIST_NUM_CHANNELS = 28, 1
#: IDX magic number = (data type code << 8) | number of dimensions; 0x08 = unsigned byte.
IDX_UBYTE_TYPE_CODE = 0x08
IDX_IMAGES_MAGIC = (IDX_UBYTE_TYPE_CODE << 8) | 3  # 2051: [N, rows, cols]
IDX_LABELS_MAGIC = (IDX_UBYTE_TYPE_CODE << 8) | 1  # 2049: [N]
_IDX_WORD_BYTES = 4  # magic number and each dimension size: big-endian uint32

MNIST_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    # the benchmark's held-out set: 500 images per class from the training split
    "train5k": ("train5k-images-idx3-ubyte.gz", "train5k-labels-idx1-ubyte.gz"),
}
#: Published MD5 of every MNIST file this module reads.
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "train5k-images-idx3-ubyte.gz": "6057ca5a67cd8660e9946050476aec42",
    "train5k-labels-idx1-ubyte.gz": "f4e4f8640ad2a3b028472f5598c37e79",
}
#: Mirrors tried in order; the S3 one is torchvision's, the second the original site.
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
#: Splits shipped inside the package (sde/assets/mnist), identical to the files above.
MNIST_EMBEDDED_SPLITS = ("test", "train5k")
#: The embedded split that stands in, with a warning, for a training split that is missing.
MNIST_EMBEDDED_SPLIT = "test"


class EmbeddedMNISTWarning(UserWarning):
    """The requested MNIST split was not in data_dir; the embedded test split is used."""


def read_idx(path: Path | Traversable, *, expected_magic: int, md5: str | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzip-compressed if its name ends in .gz).

    Checks, in order: the MD5 (when given), the magic number, and that the sizes in the
    header account for the file's length exactly. Errors name the file.
    """
    source = str(path)
    content = path.read_bytes()
    check_md5(hashlib.md5(content, usedforsecurity=False).hexdigest(), source, md5)
    if path.name.endswith(".gz"):
        try:
            content = gzip.decompress(content)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{source}: not a valid gzip file ({err})") from err
    if len(content) < _IDX_WORD_BYTES:
        raise ValueError(f"{source}: {len(content)} bytes is too short for an IDX header")
    magic = int.from_bytes(content[:_IDX_WORD_BYTES], "big")
    if magic != expected_magic:
        raise ValueError(f"{source}: IDX magic number {magic}, expected {expected_magic} "
                         f"({IDX_IMAGES_MAGIC} for images, {IDX_LABELS_MAGIC} for labels)")
    ndim = magic & 0xFF
    header_bytes = _IDX_WORD_BYTES * (1 + ndim)
    if len(content) < header_bytes:
        raise ValueError(f"{source}: {len(content)} bytes cannot hold the {header_bytes}-byte IDX header")
    shape = tuple(int.from_bytes(content[_IDX_WORD_BYTES * (1 + i):_IDX_WORD_BYTES * (2 + i)], "big")
                  for i in range(ndim))
    expected_length = header_bytes + math.prod(shape)
    if len(content) != expected_length:
        raise ValueError(f"{source}: header declares shape {shape} ({expected_length} bytes with header) "
                         f"but the (decompressed) file has {len(content)} bytes")
    return np.frombuffer(content, dtype=np.uint8, offset=header_bytes).reshape(shape)


def _embedded_mnist_file(name: str) -> Traversable:
    return importlib.resources.files("sde").joinpath("assets", "mnist", name)


def _read_mnist_pair(image_file: Path | Traversable, label_file: Path | Traversable,
                     checksums: Mapping[str, str]) -> tuple[Tensor, Tensor]:
    images = read_idx(image_file, expected_magic=IDX_IMAGES_MAGIC, md5=checksums.get(image_file.name))
    labels = read_idx(label_file, expected_magic=IDX_LABELS_MAGIC, md5=checksums.get(label_file.name))
    if images.shape[1:] != (MNIST_IMAGE_SIZE, MNIST_IMAGE_SIZE):
        raise ValueError(f"{image_file}: images are {images.shape[1]}x{images.shape[2]}, "
                         f"MNIST images are {MNIST_IMAGE_SIZE}x{MNIST_IMAGE_SIZE}")
    if len(images) != len(labels):
        raise ValueError(f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise ValueError(f"{label_file}: label {labels.max()} is outside 0..{NUM_CLASSES - 1}")
    return (torch.from_numpy(images.copy()).unsqueeze(1),  # [N, 1, 28, 28]
            torch.from_numpy(labels.astype(np.int64)))


def load_mnist(data_dir: str | Path, split: str, *, download: bool, checksums: Mapping[str, str] | None = None,
               fetch: Fetch | None = None) -> tuple[Tensor, Tensor]:
    """MNIST ``split`` ("train", "test" or "train5k") as uint8 [N, 1, 28, 28] and int64 labels.

    Order: the IDX files in ``data_dir``; else, for the embedded splits (test, train5k), the
    package's copy, which is the published file (no download, no warning); else, for
    "train", the mirrors if ``download`` (MD5 checked), and failing that the embedded
    official test split with an ``EmbeddedMNISTWarning``. A file present in ``data_dir``
    is verified before anything can stand in for it: corrupt is an error. ``checksums``
    maps file names to MD5s (default ``MNIST_MD5``); ``fetch`` defaults to ``fetch_url``.
    """
    if split not in MNIST_SPLIT_FILES:
        raise ValueError(f"unknown MNIST split {split!r}; valid: {', '.join(MNIST_SPLIT_FILES)}")
    checksums = MNIST_MD5 if checksums is None else checksums
    fetch = fetch_url if fetch is None else fetch
    data_dir = Path(data_dir)
    image_path, label_path = (data_dir / name for name in MNIST_SPLIT_FILES[split])
    missing = [path for path in (image_path, label_path) if not path.is_file()]
    if not missing:
        return _read_mnist_pair(image_path, label_path, checksums)
    for path, magic in ((image_path, IDX_IMAGES_MAGIC), (label_path, IDX_LABELS_MAGIC)):
        if path.is_file():
            read_idx(path, expected_magic=magic, md5=checksums.get(path.name))
    if split in MNIST_EMBEDDED_SPLITS:
        return _read_embedded(split)
    if not download:
        reason = "download disabled"
    else:
        failures = [failure for path in missing
                    if (failure := download_file(path, [mirror + path.name for mirror in MNIST_MIRRORS],
                                            checksums.get(path.name), fetch)) is not None]
        if not failures:
            return _read_mnist_pair(image_path, label_path, checksums)
        url, _, error = failures[0].split("; ")[0].partition(": ")  # the first mirror's answer
        first = f"{url.rsplit('/', 1)[-1]}: {error}"
        reason = "download failed: " + (first if len(first) <= 120 else first[:117] + "...")
    warnings.warn(f"MNIST {split!r} is not in {data_dir} ({reason}); using the embedded MNIST "
                  f"{MNIST_EMBEDDED_SPLIT!r} split (10,000 images) instead", EmbeddedMNISTWarning, stacklevel=2)
    return _read_embedded(MNIST_EMBEDDED_SPLIT)


def _read_embedded(split: str) -> tuple[Tensor, Tensor]:
    """The package's copy of ``split``, MD5 checked against the published files."""
    images, labels = (_embedded_mnist_file(name) for name in MNIST_SPLIT_FILES[split])
    return _read_mnist_pair(images, labels, MNIST_MD5)


def _load(data: ml_collections.ConfigDict, split: str, seed: int) -> tuple[Tensor, Tensor]:
    return load_mnist(data.data_dir, split, download=data.download)


def _check(data: ml_collections.ConfigDict) -> None:
    check_image_config(data, "mnist", MNIST_IMAGE_SIZE, MNIST_NUM_CHANNELS, flips=False)


DATASET = register(Dataset(
    name="mnist", kind="image", splits=tuple(MNIST_SPLIT_FILES), load=_load,
    example_shape=lambda data: (MNIST_NUM_CHANNELS, MNIST_IMAGE_SIZE, MNIST_IMAGE_SIZE),
    check=_check, num_classes=NUM_CLASSES, classifier="mnist", preview_split="test",
    other_splits="full MNIST (60,000 images): --config.data.split=train (downloaded once into data.data_dir)"))
