"""CIFAR-10 (Krizhevsky 2009): the python pickle batches, read without running pickled code."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import torch

from sde.data.datasets import NUM_CLASSES, Dataset, check_image_config, register
from sde.data.files import Fetch, check_md5, download_file, fetch_url, file_md5

Tensor = torch.Tensor

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
    check_md5(hashlib.md5(content, usedforsecurity=False).hexdigest(), str(path), md5)
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
                failure = download_file(archive, [CIFAR10_URL], checksums.get(CIFAR10_ARCHIVE), fetch)
                reason = f"and the download failed: {failure}" if failure else ""
            else:
                reason += " (download disabled)"
        if not archive.is_file():
            raise FileNotFoundError(f"CIFAR-10 split {split!r}: {', '.join(missing)} not found in {batch_dir} "
                                    f"{reason}; put {CIFAR10_ARCHIVE} ({CIFAR10_URL}) in {data_dir}")
        check_md5(file_md5(archive), str(archive), checksums.get(CIFAR10_ARCHIVE))
        _extract_cifar10_batches(archive, missing, batch_dir)
    batches = [read_cifar10_batch(batch_dir / name, md5=checksums.get(name)) for name in CIFAR10_SPLIT_FILES[split]]
    return torch.cat([images for images, _ in batches]), torch.cat([labels for _, labels in batches])


def _load(data: ml_collections.ConfigDict, split: str, seed: int) -> tuple[Tensor, Tensor]:
    return load_cifar10(data.data_dir, split, download=data.download)


def _check(data: ml_collections.ConfigDict) -> None:
    check_image_config(data, "cifar10", CIFAR10_IMAGE_SIZE, CIFAR10_NUM_CHANNELS, flips=True)


DATASET = register(Dataset(
    name="cifar10", kind="image", splits=tuple(CIFAR10_SPLIT_FILES), load=_load,
    example_shape=lambda data: (CIFAR10_NUM_CHANNELS, CIFAR10_IMAGE_SIZE, CIFAR10_IMAGE_SIZE),
    check=_check, num_classes=NUM_CLASSES, preview_split="test"))
