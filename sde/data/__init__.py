"""Data sets (MNIST, CIFAR-10, toy 1-D and 2-D), pixel scaling and a resumable batch stream.

Loading: ``load_dataset(config, split)`` returns the raw data, images as ``torch.uint8``
``[N, C, H, W]`` (point sets: float32 ``[N, D]``) and int64 labels (point sets: ``None``).
The modules of this package, along their seams:

* ``datasets``: ``Dataset``, how a data set describes itself; ``load_dataset``;
* ``mnist``, ``cifar10``, ``toy``: one data set each (a module that defines ``DATASET``);
* ``scaling``: the map between 8-bit pixels and the model's [-1, 1], with dequantization;
* ``files``: MD5 checks and downloads; ``seeds``: the seeds of the random streams;
* ``stream``: ``BatchStream``, the seeded, resumable, shardable training batches.

Every module of the package is imported here, so each data set module registers its
``DATASET`` in ``DATASETS``: a new data set is one new module.
"""
import importlib
import pkgutil

from sde.data.cifar10 import (CIFAR10_ARCHIVE, CIFAR10_DIR, CIFAR10_IMAGE_SIZE, CIFAR10_MD5,
                              CIFAR10_NUM_CHANNELS, CIFAR10_SPLIT_FILES, CIFAR10_URL, load_cifar10,
                              read_cifar10_batch)
from sde.data.datasets import (DATASETS, KINDS, NUM_CLASSES, Dataset, describe, evaluation_subset,
                               get_dataset, load_dataset, register, sample_shape, validate_data_config)
from sde.data.files import DOWNLOAD_TIMEOUT_S, Fetch, fetch_url, file_md5
from sde.data.mnist import (IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, IDX_UBYTE_TYPE_CODE,
                            MNIST_EMBEDDED_SPLIT, MNIST_EMBEDDED_SPLITS, MNIST_IMAGE_SIZE, MNIST_MD5,
                            MNIST_MIRRORS, MNIST_NUM_CHANNELS, MNIST_SPLIT_FILES, EmbeddedMNISTWarning,
                            load_mnist, read_idx)
from sde.data.scaling import (MAX_PIXEL_VALUE, NUM_PIXEL_LEVELS, float_to_uint8, training_view,
                              uint8_to_float)
from sde.data.stream import BatchStream, DevicePrefetcher, create_batch_stream
from sde.data.toy import (CLOSED_FORM_NAMES, GAUSSIAN_COV, GAUSSIAN_MEAN, SPIRAL_NOISE_STD, SPIRAL_TURNS,
                          TOY_DIM, TOY_NAMES, TWO_GAUSSIANS_COVS, TWO_GAUSSIANS_MEANS, TWO_GAUSSIANS_WEIGHTS,
                          GaussianMixture, load_toy, sample_spiral, toy_dim, toy_mixture)


for _module in pkgutil.iter_modules(__path__):  # every data set module registers itself
    importlib.import_module(f"{__name__}.{_module.name}")

#: data set name -> its splits.
SPLITS = {name: dataset.splits for name, dataset in DATASETS.items()}

__all__ = [
    "BatchStream", "CLOSED_FORM_NAMES", "DevicePrefetcher", "CIFAR10_ARCHIVE", "CIFAR10_DIR", "CIFAR10_IMAGE_SIZE",
    "CIFAR10_MD5",
    "CIFAR10_NUM_CHANNELS", "CIFAR10_SPLIT_FILES", "CIFAR10_URL", "DATASETS", "DOWNLOAD_TIMEOUT_S",
    "Dataset", "EmbeddedMNISTWarning", "Fetch", "GAUSSIAN_COV", "GAUSSIAN_MEAN", "GaussianMixture",
    "IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC", "IDX_UBYTE_TYPE_CODE", "KINDS", "MAX_PIXEL_VALUE",
    "MNIST_EMBEDDED_SPLIT", "MNIST_EMBEDDED_SPLITS", "MNIST_IMAGE_SIZE",
    "MNIST_MD5", "MNIST_MIRRORS", "MNIST_NUM_CHANNELS", "MNIST_SPLIT_FILES", "NUM_CLASSES",
    "NUM_PIXEL_LEVELS", "SPIRAL_NOISE_STD", "SPIRAL_TURNS", "SPLITS", "TOY_DIM", "TOY_NAMES", "TWO_GAUSSIANS_COVS",
    "TWO_GAUSSIANS_MEANS", "TWO_GAUSSIANS_WEIGHTS", "create_batch_stream", "describe", "evaluation_subset",
    "fetch_url", "file_md5", "float_to_uint8", "get_dataset", "load_cifar10", "load_dataset", "load_mnist",
    "load_toy", "read_cifar10_batch", "read_idx", "register", "sample_shape", "sample_spiral", "toy_dim", "toy_mixture",
    "training_view", "uint8_to_float", "validate_data_config",
]
