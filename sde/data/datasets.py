"""How a data set describes itself, and the one entry point that loads any of them.

Each data set is a module of this package that defines ``DATASET = register(Dataset(...))``:
its name (``config.data.dataset``), what its examples are, its splits, its loader, the
checks of ``config.data`` it needs and the classifier that judges its samples. ``sde.data``
imports every module of the package, so each registers itself in ``DATASETS`` and adding a
data set is one new module (docs/design.md, "Extending").
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ml_collections
import torch

from sde import randomness

Tensor = torch.Tensor

#: The kinds of examples: uint8 images [N, C, H, W] (scaled by ``sde.data.scaling``, shown
#: as grids, scored by FID) or float32 points [N, D] (shown as scatter plots).
KINDS = ("image", "points")
#: MNIST digits and CIFAR-10 classes alike.
NUM_CLASSES = 10
#: name -> ``Dataset``, in the order the data set modules register.
DATASETS: dict[str, "Dataset"] = {}


@dataclass(frozen=True)
class Dataset:
    """A data set as the toolkit sees it.

    name: the value of ``config.data.dataset``.
    kind: "image" or "points" (``KINDS``).
    splits: the accepted values of ``data.split`` and ``eval.heldout_split``.
    load(data_config, split, seed): (examples, int64 labels or None); images uint8
      [N, C, H, W], points float32 [N, D]. ``seed`` is the run's (generated sets use it).
    example_shape(data_config): the shape of one example, e.g. (1, 28, 28) or (2,).
    check(data_config): raise a one-line ValueError for settings this set cannot honour.
    num_classes: labels are 0..num_classes-1 (0: the set has no labels).
    classifier: the name of the ``evaluation`` classifier that judges generated samples
      (classifier confidence and class histogram), or None.
    preview_split: the split whose examples are shown beside samples (the forward-noising
      rows of a trajectory); None: ``data.split``.
    other_splits: a hint shown beside a run's data line, e.g. how to train on the full set.
    """

    name: str
    kind: str
    splits: tuple[str, ...]
    load: Callable[[ml_collections.ConfigDict, str, int], tuple[Tensor, Tensor | None]]
    example_shape: Callable[[ml_collections.ConfigDict], tuple[int, ...]]
    check: Callable[[ml_collections.ConfigDict], None]
    num_classes: int = 0
    classifier: str | None = None
    preview_split: str | None = None
    other_splits: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"data set {self.name!r}: kind {self.kind!r} is not one of {KINDS}")

    @property
    def is_image(self) -> bool:
        return self.kind == "image"


def register(dataset: Dataset) -> Dataset:
    """Add ``dataset`` to ``DATASETS`` under its name (once); returns it."""
    if dataset.name in DATASETS and DATASETS[dataset.name] is not dataset:
        raise ValueError(f"two data set modules define {dataset.name!r}")
    DATASETS[dataset.name] = dataset
    return dataset


def check_image_config(data: ml_collections.ConfigDict, name: str, image_size: int,
                       num_channels: int, *, flips: bool) -> None:
    """The checks every 8-bit image set shares: its image shape, and whether a left-right
    flip keeps an example in the set (``flips``)."""
    if (data.image_size, data.num_channels) != (image_size, num_channels):
        raise ValueError(f"{name} images are {image_size}x{image_size} with {num_channels} channel(s), "
                         f"but the config has image_size={data.image_size}, num_channels={data.num_channels}")
    if data.random_flip and not flips:
        raise ValueError(f"random_flip is refused for {name}: a flipped image is not one of its examples "
                         f"(a flipped digit is not a digit); cifar10 takes it")


def get_dataset(name: str) -> Dataset:
    """The data set called ``name``; a ValueError lists the accepted names."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    return DATASETS[name]


def validate_data_config(config: ml_collections.ConfigDict, split: str | None = None) -> None:
    """Raise a one-line ValueError if ``config.data`` (and ``split``) cannot be loaded."""
    data = config.data
    dataset = get_dataset(data.dataset)
    split = data.split if split is None else split
    if split not in dataset.splits:
        raise ValueError(f"unknown {data.dataset} split {split!r}; valid: {', '.join(dataset.splits)}")
    if tuple(data.classes):
        if not dataset.num_classes:
            raise ValueError(f"classes={tuple(data.classes)} needs labels; the {dataset.name} sets have none")
        if not all(isinstance(c, int) and 0 <= c < dataset.num_classes for c in data.classes):
            raise ValueError(f"classes must be ints in 0..{dataset.num_classes - 1}, got {tuple(data.classes)}")
    dataset.check(data)


def load_dataset(config: ml_collections.ConfigDict, split: str | None = None) -> tuple[Tensor, Tensor | None]:
    """The raw ``split`` (default ``config.data.split``) of ``config.data.dataset``.

    Returns (images uint8 [N, C, H, W], labels int64 [N]) for image sets, keeping only
    ``config.data.classes`` when given, and (points float32 [N, D], None) for point sets.
    Scaling and augmentation happen in ``BatchStream`` / ``uint8_to_float``.
    """
    validate_data_config(config, split)
    data = config.data
    split = data.split if split is None else split
    examples, labels = get_dataset(data.dataset).load(data, split, config.seed)
    if tuple(data.classes):
        keep = torch.isin(labels, torch.tensor(tuple(data.classes), dtype=labels.dtype))
        if not keep.any():
            raise ValueError(f"no {data.dataset} {split!r} images have classes {tuple(data.classes)}")
        examples, labels = examples[keep], labels[keep]
    return examples, labels


def sample_shape(config: ml_collections.ConfigDict, count: int) -> tuple[int, ...]:
    """Shape of ``count`` examples of the configured data, e.g. [count, C, H, W] or [count, 2]."""
    return (count, *get_dataset(config.data.dataset).example_shape(config.data))


def evaluation_subset(images: Tensor, labels: Tensor | None, count: int, seed: int = 0
                      ) -> tuple[Tensor, Tensor | None]:
    """``count`` images (all when ``count`` <= 0 or >= N) in a fixed random order.

    Evaluation subsets must not be the first ``count`` rows: files such as ``train5k`` are
    sorted by class, so its first 100 images are all zeros. The order is a permutation
    seeded by ``seed`` alone, so every run, rank count and metric sees the same images.
    """
    if count <= 0 or count >= len(images):
        return images, labels
    order = randomness.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
    return images[order], None if labels is None else labels[order]


def describe(config, count: int) -> str:
    """The one line a run prints about its data: set, split, size and, for a subset, the hint
    of how to use the rest (``Dataset.other_splits``)."""
    dataset = get_dataset(config.data.dataset)
    if dataset.kind == "points":
        return f"{config.data.dataset} ({config.data.toy_name}), {count:,} points"
    text = f"{config.data.dataset} {config.data.split} split, {count:,} images"
    return f"{text}; {dataset.other_splits}" if dataset.other_splits and config.data.split != "train" else text
