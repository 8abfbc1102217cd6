"""Datasets (MNIST, CIFAR-10, toy 2-D), pixel scaling and a resumable batch stream.

Loading: ``load_dataset(config, split)`` returns the raw data, images as ``torch.uint8``
``[N, C, H, W]`` (toy sets: float32 points ``[N, 2]``) and int64 labels (toy: ``None``).
Files are looked up in ``config.data.data_dir`` first; missing ones are downloaded (MD5
checked) when ``config.data.download`` is set; MNIST then falls back to the copy of its
official test split shipped in ``sde/assets/mnist`` (with an ``EmbeddedMNISTWarning``).
A file that is present but corrupt is always an error.

Scaling (the map from 8-bit pixels ``u`` in {0..255} to the model's ``x``):

    plain:        x = u / 255 * 2 - 1                    x in [-1, 1], both ends reached
    dequantized:  x = (u + v) / 256 * 2 - 1,  v ~ U[0, 1)   x in [-1, 1), continuous

The dequantized map (Theis et al. 2016, "A note on the evaluation of generative models",
Sec. 3.1; Ho et al. 2020 / Song et al. 2021 use it for bits/dim) sends each pixel value
to its own bin of width 2 / NUM_PIXEL_LEVELS. With y = u + v in [0, 256)^D the change of
variables x = y * (2 / 256) - 1 gives ``log p_y(y) = log p_x(x) + D log(2 / 256)``, so
``bits/dim = -log2 p_x(x) / D + log2(NUM_PIXEL_LEVELS / 2)`` (= +7 bits for 8-bit data).
``float_to_uint8`` inverts either map exactly (round trip is the identity on uint8).

Training batches: ``BatchStream`` is an infinite, seeded iterator over one split whose
``state_dict()`` = (epoch, position) resumes at the exact sample, bit for bit, and which
shards each global batch across DistributedDataParallel ranks.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import importlib.resources
import io
import logging
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np
import torch

if TYPE_CHECKING:  # Python >= 3.11 location; annotations only
    from importlib.resources.abc import Traversable

Tensor = torch.Tensor
#: ``fetch(url, destination, timeout_s)`` writes the body of ``url`` to ``destination``.
Fetch = Callable[[str, Path, float], None]

_logger = logging.getLogger(__name__)

DATASETS = ("mnist", "cifar10", "toy")
TOY_NAMES = ("gaussian", "two_gaussians", "spiral")
NUM_CLASSES = 10  # MNIST digits and CIFAR-10 classes alike

#: 8-bit pixels: u in {0, ..., NUM_PIXEL_LEVELS - 1}.
NUM_PIXEL_LEVELS = 2 ** 8
MAX_PIXEL_VALUE = NUM_PIXEL_LEVELS - 1

#: Socket timeout of every download request; a few seconds so offline runs fail fast.
DOWNLOAD_TIMEOUT_S = 5.0

# ---- MNIST (LeCun, Cortes & Burges; IDX format) ----------------------------------------
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
#: Splits published on the mirrors (train5k exists only as the benchmark's own files).
MNIST_DOWNLOADABLE_SPLITS = ("train", "test")
#: The split shipped inside the package (sde/assets/mnist) and used when files are missing.
MNIST_EMBEDDED_SPLIT = "test"

# ---- CIFAR-10 (Krizhevsky 2009; python pickle batches) ----------------------------------
CIFAR10_IMAGE_SIZE, CIFAR10_NUM_CHANNELS = 32, 3
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_SPLIT_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
#: Published MD5 of the archive and of each batch it contains (as torchvision checks them).
CIFAR10_MD5 = {
    CIFAR10_ARCHIVE: "c58f30108f718f92721af3b95e74349a",
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}

SPLITS = {"mnist": tuple(MNIST_SPLIT_FILES), "cifar10": tuple(CIFAR10_SPLIT_FILES), "toy": ("train", "test")}
_IMAGE_SHAPES = {  # dataset -> (image_size, num_channels)
    "mnist": (MNIST_IMAGE_SIZE, MNIST_NUM_CHANNELS),
    "cifar10": (CIFAR10_IMAGE_SIZE, CIFAR10_NUM_CHANNELS),
}

# ---- toy 2-D sets -----------------------------------------------------------------------
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

# Independent random streams: first word of every derived seed (see _derived_seed).
_PERMUTATION_STREAM, _AUGMENTATION_STREAM, _TOY_STREAM = 0, 1, 2


class EmbeddedMNISTWarning(UserWarning):
    """The requested MNIST split was not in data_dir; the embedded test split is used."""


# =========================================================================================
# Scaling
# =========================================================================================
def uint8_to_float(images: Tensor, *, dequantize: bool, generator: torch.Generator | None = None) -> Tensor:
    """Map uint8 pixels ``u`` to float32 ``x``: ``u/255*2-1`` or, dequantized, ``(u+v)/256*2-1``.

    Dequantization (Theis et al. 2016, Sec. 3.1) adds ``v ~ U[0, 1)`` drawn from
    ``generator``, giving continuous data in [-1, 1) on which bits/dim is well defined.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"uint8_to_float expects torch.uint8 pixels, got {images.dtype}")
    pixels = images.to(torch.float32)
    if not dequantize:
        return pixels / MAX_PIXEL_VALUE * 2 - 1
    noise = torch.rand(images.shape, generator=generator, dtype=torch.float32, device=images.device)
    return (pixels + noise) / NUM_PIXEL_LEVELS * 2 - 1


def training_view(batch: Tensor, *, random_flip: bool, dequantize: bool,
                  generator: torch.Generator) -> Tensor:
    """A batch as training sees it: uint8 images flipped left-right with probability 1/2
    (``random_flip``) and scaled by ``uint8_to_float``; points (toy data) unchanged."""
    if batch.dtype != torch.uint8:
        return batch
    if random_flip:
        flip = torch.rand(len(batch), generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    return uint8_to_float(batch, dequantize=dequantize, generator=generator)


def float_to_uint8(x: Tensor, *, dequantized: bool) -> Tensor:
    """Inverse of ``uint8_to_float`` (for saving samples): float in [-1, 1] -> uint8.

    Plain data: ``u = round((x + 1) / 2 * 255)``. Dequantized data: ``u`` is the bin that
    contains ``x``, ``floor((x + 1) / 2 * 256)``. Values outside [-1, 1] are clipped.
    """
    unit = (x.detach().to(torch.float32).clamp(-1, 1) + 1) / 2
    if dequantized:
        pixels = torch.floor(unit * NUM_PIXEL_LEVELS)
    else:
        pixels = torch.round(unit * MAX_PIXEL_VALUE)
    return pixels.clamp(0, MAX_PIXEL_VALUE).to(torch.uint8)


# =========================================================================================
# Files: MD5, download
# =========================================================================================
_MD5_CHUNK_BYTES = 1 << 20


def file_md5(path: Path | Traversable) -> str:
    """Hex MD5 of a file, read in chunks (the CIFAR-10 archive is 163 MiB)."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as stream:
        while chunk := stream.read(_MD5_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _check_md5(actual_md5: str, source: str, expected_md5: str | None) -> None:
    if expected_md5 is not None and actual_md5 != expected_md5:
        raise ValueError(f"{source}: MD5 {actual_md5} does not match the published {expected_md5}; "
                         "the file is corrupt or not the expected one (delete it to re-download)")


def fetch_url(url: str, destination: Path, timeout_s: float) -> None:
    """Download ``url`` into ``destination`` (the default ``Fetch``; tests replace it)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(destination, "wb") as out:
        shutil.copyfileobj(response, out)


def _download(destination: Path, urls: Sequence[str], expected_md5: str | None, fetch: Fetch) -> str | None:
    """Fetch ``destination`` from the first of ``urls`` that works; None or why all failed.

    Each attempt writes a temporary file next to ``destination``, checks its MD5 and only
    then renames it into place, so an interrupted or bad download never leaves a file
    that a later run would take for the real one.
    """
    failures = []
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create {destination.parent}: {err}"
    for url in urls:
        handle, temp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
        os.close(handle)
        temp_path = Path(temp_name)
        try:
            _logger.info("downloading %s", url)
            fetch(url, temp_path, DOWNLOAD_TIMEOUT_S)
            _check_md5(file_md5(temp_path), url, expected_md5)
            os.replace(temp_path, destination)
            return None
        except (OSError, http.client.HTTPException, ValueError) as err:
            failures.append(f"{url}: {err}")
        finally:
            temp_path.unlink(missing_ok=True)
    return "; ".join(failures)


# =========================================================================================
# MNIST
# =========================================================================================
def read_idx(path: Path | Traversable, *, expected_magic: int, md5: str | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzip-compressed if its name ends in .gz).

    Checks, in order: the MD5 (when given), the magic number, and that the sizes in the
    header account for the file's length exactly. Errors name the file.
    """
    source = str(path)
    content = path.read_bytes()
    _check_md5(hashlib.md5(content, usedforsecurity=False).hexdigest(), source, md5)
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

    Order: the IDX files in ``data_dir``; else, if ``download``, the mirrors (MD5 checked);
    else, for train/test, the embedded official test split with an ``EmbeddedMNISTWarning``.
    "train5k" is the benchmark's held-out set and is never replaced by the embedded copy
    (that would measure held-out likelihood on the training images): missing -> error.
    ``checksums`` maps file names to MD5s (default ``MNIST_MD5``); ``fetch`` defaults to
    ``fetch_url``.
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
    # A present file is verified before anything can stand in for it: corrupt is an error.
    for path, magic in ((image_path, IDX_IMAGES_MAGIC), (label_path, IDX_LABELS_MAGIC)):
        if path.is_file():
            read_idx(path, expected_magic=magic, md5=checksums.get(path.name))
    if split not in MNIST_DOWNLOADABLE_SPLITS:
        raise FileNotFoundError(f"MNIST split {split!r}: {', '.join(p.name for p in missing)} not found in "
                                f"{data_dir}; copy the benchmark's {split}-*-ubyte.gz files there (it is not on the "
                                "mirrors, and the embedded test split cannot stand in for a held-out set)")
    if not download:
        reason = "download disabled"
    else:
        failures = [failure for path in missing
                    if (failure := _download(path, [mirror + path.name for mirror in MNIST_MIRRORS],
                                             checksums.get(path.name), fetch)) is not None]
        if not failures:
            return _read_mnist_pair(image_path, label_path, checksums)
        reason = "download failed: " + "; ".join(failures)
    embedded_images, embedded_labels = (_embedded_mnist_file(name) for name in MNIST_SPLIT_FILES[MNIST_EMBEDDED_SPLIT])
    warnings.warn(f"MNIST split {split!r} was not found in {data_dir} (missing {', '.join(p.name for p in missing)}; "
                  f"{reason}); using the embedded copy of the MNIST {MNIST_EMBEDDED_SPLIT!r} split (10,000 images) "
                  "instead", EmbeddedMNISTWarning, stacklevel=2)
    return _read_mnist_pair(embedded_images, embedded_labels, MNIST_MD5)


# =========================================================================================
# CIFAR-10
# =========================================================================================
#: numpy's own array-unpickling helper (``numpy.core.multiarray._reconstruct`` in numpy 1.x,
#: ``numpy._core.multiarray._reconstruct`` in 2.x), taken from an array's reduction so no
#: private module is imported.
_NDARRAY_RECONSTRUCT = np.empty(0).__reduce__()[0]


def _plain_dtype(*args: Any) -> np.dtype:
    """``numpy.dtype`` for the unpickler, refusing object dtypes (they would unpickle objects)."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"refused numpy dtype {dtype}: it holds Python objects")
    return dtype


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays, nothing else.

    A pickle can name any importable callable (a "global") and have it called with
    arguments of its choosing; ``os.system`` is one line away. The published CIFAR-10
    batches (Python 2 cPickle, protocol 2) hold only dicts, lists, ints, byte strings and
    one uint8 ndarray, whose reduction names exactly three globals: the module-level
    ``_reconstruct`` (an empty ndarray of a given subclass; we only hand out ``ndarray``
    itself), ``ndarray`` (its argument) and ``dtype`` (here restricted to non-object
    dtypes, so no array can carry pickled objects). Every other global -- including other
    numpy functions and everything in builtins -- is refused, and persistent ids are
    refused by the base class.
    """

    _ALLOWED_GLOBALS = {
        ("numpy.core.multiarray", "_reconstruct"): _NDARRAY_RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _NDARRAY_RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _plain_dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: only numpy array "
                                         "reconstruction is allowed") from None


def read_cifar10_batch(path: Path, *, md5: str | None = None) -> tuple[Tensor, Tensor]:
    """One CIFAR-10 python batch as uint8 [n, 3, 32, 32] and int64 labels [n].

    Unpickled with ``encoding="bytes"`` (keys are Python 2 byte strings) through
    ``_ArrayOnlyUnpickler``; a file that needs any other global is refused.
    """
    content = path.read_bytes()
    _check_md5(hashlib.md5(content, usedforsecurity=False).hexdigest(), str(path), md5)
    try:
        batch = _ArrayOnlyUnpickler(io.BytesIO(content), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"{path}: not a CIFAR-10 batch, refused to unpickle it ({err})") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path}: a CIFAR-10 batch is a dict with keys b'data' and b'labels'")
    data, labels = batch[b"data"], batch[b"labels"]
    pixels_per_image = CIFAR10_NUM_CHANNELS * CIFAR10_IMAGE_SIZE ** 2
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == pixels_per_image):
        shape = getattr(data, "shape", None)
        raise ValueError(f"{path}: b'data' must be a uint8 array [n, {pixels_per_image}], got "
                         f"{type(data).__name__} {getattr(data, 'dtype', '')} {shape}")
    if not (isinstance(labels, list) and len(labels) == len(data)
            and all(isinstance(label, int) and 0 <= label < NUM_CLASSES for label in labels)):
        raise ValueError(f"{path}: b'labels' must be a list of {len(data)} ints in 0..{NUM_CLASSES - 1}")
    # each row: 1024 red, 1024 green, 1024 blue values, each plane row-major -> NCHW
    images = data.reshape(len(data), CIFAR10_NUM_CHANNELS, CIFAR10_IMAGE_SIZE, CIFAR10_IMAGE_SIZE)
    return torch.from_numpy(images.copy()), torch.tensor(labels, dtype=torch.int64)


def _extract_cifar10_batches(archive: Path, names: Sequence[str], batch_dir: Path) -> None:
    """Copy the named batch files out of the archive (by exact member name: no path games)."""
    batch_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        for name in names:
            member_name = f"{CIFAR10_DIR}/{name}"
            try:
                member = tar.getmember(member_name)
            except KeyError:
                raise ValueError(f"{archive}: has no member {member_name}") from None
            source = tar.extractfile(member) if member.isfile() else None
            if source is None:
                raise ValueError(f"{archive}: member {member_name} is not a regular file")
            handle, temp_name = tempfile.mkstemp(dir=batch_dir, prefix=f".{name}.", suffix=".part")
            with os.fdopen(handle, "wb") as out:
                shutil.copyfileobj(source, out)
            os.replace(temp_name, batch_dir / name)


def load_cifar10(data_dir: str | Path, split: str, *, download: bool, checksums: Mapping[str, str] | None = None,
                 fetch: Fetch | None = None) -> tuple[Tensor, Tensor]:
    """CIFAR-10 ``split`` ("train" or "test") as uint8 [N, 3, 32, 32] and int64 labels.

    Order: ``data_dir/cifar-10-batches-py/*``; else the archive ``data_dir/
    cifar-10-python.tar.gz`` (downloaded first if missing and ``download``); else an
    error saying what to put where. Every file with a known MD5 (``checksums``, default
    ``CIFAR10_MD5``) is checked. There is no embedded copy.
    """
    if split not in CIFAR10_SPLIT_FILES:
        raise ValueError(f"unknown CIFAR-10 split {split!r}; valid: {', '.join(CIFAR10_SPLIT_FILES)}")
    checksums = CIFAR10_MD5 if checksums is None else checksums
    fetch = fetch_url if fetch is None else fetch
    data_dir = Path(data_dir)
    batch_dir = data_dir / CIFAR10_DIR
    missing = [name for name in CIFAR10_SPLIT_FILES[split] if not (batch_dir / name).is_file()]
    if missing:
        archive = data_dir / CIFAR10_ARCHIVE
        reason = f"and {archive} is absent"
        if not archive.is_file():
            if download:
                failure = _download(archive, [CIFAR10_URL], checksums.get(CIFAR10_ARCHIVE), fetch)
                reason = f"and the download failed: {failure}" if failure else ""
            else:
                reason += " (download disabled)"
        if not archive.is_file():
            raise FileNotFoundError(f"CIFAR-10 split {split!r}: {', '.join(missing)} not found in {batch_dir} "
                                    f"{reason}; put {CIFAR10_ARCHIVE} ({CIFAR10_URL}) in {data_dir}")
        _check_md5(file_md5(archive), str(archive), checksums.get(CIFAR10_ARCHIVE))
        _extract_cifar10_batches(archive, missing, batch_dir)
    batches = [read_cifar10_batch(batch_dir / name, md5=checksums.get(name)) for name in CIFAR10_SPLIT_FILES[split]]
    return torch.cat([images for images, _ in batches]), torch.cat([labels for _, labels in batches])


# =========================================================================================
# Toy 2-D sets
# =========================================================================================
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
        components = torch.multinomial(self.weights, num_samples, replacement=True, generator=generator)
        normal = torch.randn(num_samples, self.means.shape[1], generator=generator, dtype=torch.float64)
        cholesky = torch.linalg.cholesky(self.covariances)
        points = self.means[components] + torch.einsum("nij,nj->ni", cholesky[components], normal)
        return points.to(torch.float32)


def toy_mixture(name: str) -> GaussianMixture:
    """Closed-form parameters of the toy set ``name`` ("gaussian" or "two_gaussians")."""
    def as_tensor(values: Sequence) -> Tensor:
        return torch.tensor(values, dtype=torch.float64)

    if name == "gaussian":
        return GaussianMixture(as_tensor([1.0]), as_tensor([GAUSSIAN_MEAN]), as_tensor([GAUSSIAN_COV]))
    if name == "two_gaussians":
        return GaussianMixture(as_tensor(TWO_GAUSSIANS_WEIGHTS), as_tensor(TWO_GAUSSIANS_MEANS),
                               as_tensor(TWO_GAUSSIANS_COVS))
    if name == "spiral":
        raise ValueError("the toy set 'spiral' has no closed-form density; closed forms exist for "
                         "'gaussian' and 'two_gaussians'")
    raise ValueError(f"unknown toy set {name!r}; valid: {', '.join(TOY_NAMES)}")


def sample_spiral(num_samples: int, generator: torch.Generator) -> Tensor:
    """float32 [num_samples, 2] on the noisy spiral documented at ``SPIRAL_TURNS``."""
    radius = torch.rand(num_samples, generator=generator, dtype=torch.float64).sqrt()
    angle = 2 * math.pi * SPIRAL_TURNS * radius
    points = radius[:, None] * torch.stack([angle.cos(), angle.sin()], dim=1)
    noise = SPIRAL_NOISE_STD * torch.randn(num_samples, 2, generator=generator, dtype=torch.float64)
    return (points + noise).to(torch.float32)


def _derived_seed(*words: int) -> int:
    """A 64-bit seed from non-negative integers (numpy SeedSequence hashing).

    SeedSequence ignores trailing zero words, so each stream uses a fixed number of
    words and a distinct first word (``_*_STREAM``).
    """
    return int(np.random.SeedSequence(list(words)).generate_state(1, dtype=np.uint64)[0])


def _generator(*words: int) -> torch.Generator:
    return torch.Generator().manual_seed(_derived_seed(*words))


def load_toy(name: str, num_samples: int, seed: int, split: str) -> Tensor:
    """``num_samples`` float32 points [N, 2] of toy set ``name``; a function of (seed, split)."""
    if split not in SPLITS["toy"]:
        raise ValueError(f"unknown toy split {split!r}; valid: {', '.join(SPLITS['toy'])}")
    if num_samples < 1:
        raise ValueError(f"toy_num_samples must be >= 1, got {num_samples}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    generator = _generator(_TOY_STREAM, seed, SPLITS["toy"].index(split))
    if name == "spiral":
        return sample_spiral(num_samples, generator)
    return toy_mixture(name).sample(num_samples, generator)


# =========================================================================================
# Config and the one entry point
# =========================================================================================
def validate_data_config(config: ml_collections.ConfigDict, split: str | None = None) -> None:
    """Raise a one-line ValueError if ``config.data`` (and ``split``) cannot be loaded."""
    data = config.data
    if data.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {data.dataset!r}; valid: {', '.join(DATASETS)}")
    split = data.split if split is None else split
    if split not in SPLITS[data.dataset]:
        raise ValueError(f"unknown {data.dataset} split {split!r}; valid: {', '.join(SPLITS[data.dataset])}")
    if data.random_flip and data.dataset != "cifar10":
        raise ValueError(f"random_flip is only for cifar10 (a flipped digit is not a digit), got dataset "
                         f"{data.dataset!r}")
    if data.dataset == "toy":
        if data.toy_name not in TOY_NAMES:
            raise ValueError(f"unknown toy set {data.toy_name!r}; valid: {', '.join(TOY_NAMES)}")
        if data.dequantize:
            raise ValueError("dequantize applies to 8-bit images; the toy sets are already continuous")
        if tuple(data.classes):
            raise ValueError(f"classes={tuple(data.classes)} needs labels; the toy sets have none")
        return
    image_size, num_channels = _IMAGE_SHAPES[data.dataset]
    if (data.image_size, data.num_channels) != (image_size, num_channels):
        raise ValueError(f"{data.dataset} images are {image_size}x{image_size} with {num_channels} channel(s), "
                         f"but the config has image_size={data.image_size}, num_channels={data.num_channels}")
    bad_classes = [c for c in data.classes if not (isinstance(c, int) and 0 <= c < NUM_CLASSES)]
    if bad_classes:
        raise ValueError(f"classes must be ints in 0..{NUM_CLASSES - 1}, got {tuple(data.classes)}")


def load_dataset(config: ml_collections.ConfigDict, split: str | None = None) -> tuple[Tensor, Tensor | None]:
    """The raw ``split`` (default ``config.data.split``) of ``config.data.dataset``.

    Returns (images uint8 [N, C, H, W], labels int64 [N]) for mnist/cifar10, keeping only
    ``config.data.classes`` when given, and (points float32 [N, 2], None) for toy.
    Scaling and augmentation happen in ``BatchStream`` / ``uint8_to_float``.
    """
    validate_data_config(config, split)
    data = config.data
    split = data.split if split is None else split
    if data.dataset == "toy":
        return load_toy(data.toy_name, data.toy_num_samples, config.seed, split), None
    loader = load_mnist if data.dataset == "mnist" else load_cifar10
    images, labels = loader(data.data_dir, split, download=data.download)
    if tuple(data.classes):
        keep = torch.isin(labels, torch.tensor(tuple(data.classes), dtype=labels.dtype))
        if not keep.any():
            raise ValueError(f"no {data.dataset} {split!r} images have classes {tuple(data.classes)}")
        images, labels = images[keep], labels[keep]
    return images, labels


def evaluation_subset(images: Tensor, labels: Tensor | None, count: int, seed: int = 0
                      ) -> tuple[Tensor, Tensor | None]:
    """``count`` images (all when ``count`` <= 0 or >= N) in a fixed random order.

    Evaluation subsets must not be the first ``count`` rows: files such as ``train5k`` are
    sorted by class, so its first 100 images are all zeros. The order is a permutation
    seeded by ``seed`` alone, so every run, rank count and metric sees the same images.
    """
    if count <= 0 or count >= len(images):
        return images, labels
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
    return images[order], None if labels is None else labels[order]


# =========================================================================================
# Training batches
# =========================================================================================
class BatchStream:
    """Infinite, seeded, resumable stream of training batches, shardable across ranks.

    Epoch ``e`` visits the data in ``randperm(N)`` drawn from a generator seeded by
    (seed, e); global batches are consecutive runs of ``batch_size`` indices of that
    order, and the last ``N mod batch_size`` indices of each epoch are dropped. Rank ``r``
    of ``world_size`` takes rows ``[r b, (r+1) b)`` of every global batch, ``b =
    batch_size // world_size``. Dequantization noise and flips of a global batch come
    from a generator seeded by (seed, epoch, position); every rank draws them for the
    whole global batch (one batch of uint8 images: cheap) and keeps its rows, so the ranks' batches concatenated in rank order equal the
    single-process batch bit for bit, and a stream restored from ``state_dict()`` repeats
    exactly what the original would have produced.

    Yields float32 batches (uint8 images scaled by ``uint8_to_float``; float data as is),
    or (batch, labels) pairs when ``labels`` is given.
    """

    def __init__(self, data: Tensor, batch_size: int, seed: int, *, labels: Tensor | None = None,
                 dequantize: bool = False, random_flip: bool = False, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or batch_size > len(data):
            raise ValueError(f"batch_size must be in 1..{len(data)} (the number of examples), got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(f"the global batch_size {batch_size} must be divisible by world_size {world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if labels is not None and len(labels) != len(data):
            raise ValueError(f"got {len(labels)} labels for {len(data)} examples")
        if data.dtype != torch.uint8 and dequantize:
            raise ValueError(f"dequantize needs uint8 images, got {data.dtype} data")
        if random_flip and data.ndim != 4:
            raise ValueError(f"random_flip needs images [N, C, H, W], got shape {tuple(data.shape)}")
        self.data, self.labels = data, labels
        self.batch_size, self.seed = batch_size, seed
        self.dequantize, self.random_flip = dequantize, random_flip
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = batch_size // world_size
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, torch.empty(0, dtype=torch.int64)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.data) // self.batch_size

    def state_dict(self) -> dict[str, int]:
        """Where the stream is: the next global batch starts at ``position`` of epoch ``epoch``."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_examples": len(self.data)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if (state["seed"], state["num_examples"]) != (self.seed, len(self.data)):
            raise ValueError(f"state is for seed={state['seed']} over {state['num_examples']} examples; this stream "
                             f"has seed={self.seed} over {len(self.data)}")
        if state["epoch"] < 0 or not 0 <= state["position"] <= len(self.data):
            raise ValueError(f"invalid stream state epoch={state['epoch']}, position={state['position']}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Tensor | tuple[Tensor, Tensor]:
        if self.position + self.batch_size > len(self.data):
            self.epoch, self.position = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            self._order = torch.randperm(len(self.data), generator=_generator(_PERMUTATION_STREAM, self.seed,
                                                                               self.epoch))
            self._order_epoch = self.epoch
        global_indices = self._order[self.position:self.position + self.batch_size]
        augmentation = _generator(_AUGMENTATION_STREAM, self.seed, self.epoch, self.position)
        self.position += self.batch_size
        batch = training_view(self.data[global_indices], random_flip=self.random_flip,
                              dequantize=self.dequantize, generator=augmentation)
        rows = slice(self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size)
        batch = batch[rows].to(torch.float32)
        return batch if self.labels is None else (batch, self.labels[global_indices[rows]])


def create_batch_stream(config: ml_collections.ConfigDict, *, rank: int = 0, world_size: int = 1) -> BatchStream:
    """The training stream of ``config``: ``config.data.split`` in global batches of
    ``config.training.batch_size``, seeded by ``config.seed``, dequantized / flipped as
    ``config.data`` says, rank ``rank`` of ``world_size``."""
    data, _ = load_dataset(config)
    return BatchStream(data, config.training.batch_size, config.seed, dequantize=config.data.dequantize,
                       random_flip=config.data.random_flip, rank=rank, world_size=world_size)
