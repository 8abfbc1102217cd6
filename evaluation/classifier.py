"""An MNIST classifier trained by the toolkit, and the sample metrics it reports.

Generated digits are judged by a small CNN trained with ``python -m
evaluation.train_classifier`` on the MNIST test split (t10k) and measured on 5,000 held-out
images of the MNIST training split (train5k); its weights ship in ``evaluation/assets/``
with the measured accuracy in a JSON file next to them.

The metrics are the ones the seed presentations report: the mean confidence of the
classifier on the samples (mean max-softmax probability), the histogram of predicted
classes, and that histogram's total-variation distance from uniform (0 when every class
is generated equally often, 1 - 1/10 when all samples are one class: mode coverage).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 28, 28)
PIXEL_MAX = 255.0
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
CLASSIFIER_WEIGHTS = ASSETS_DIR / "mnist_classifier.safetensors"
CLASSIFIER_REPORT = ASSETS_DIR / "mnist_classifier.json"
#: The shipped classifiers by name (a data set names its classifier: ``sde.data.Dataset``).
CLASSIFIERS = {"mnist": CLASSIFIER_WEIGHTS}


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution (same padding), batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class MnistClassifier(nn.Module):
    """A VGG-style CNN: two conv stages with max-pooling (28 -> 14 -> 7), one more conv,
    global average pooling and a linear layer to 10 logits. Input: uint8 pixels / 255."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), dropout: float = 0.3):
        super().__init__()
        width_a, width_b, width_c = widths
        self.features = nn.Sequential(
            _conv_block(IMAGE_SHAPE[0], width_a),
            _conv_block(width_a, width_a),
            nn.MaxPool2d(2),
            _conv_block(width_a, width_b),
            _conv_block(width_b, width_b),
            nn.MaxPool2d(2),
            _conv_block(width_b, width_c),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width_c, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, 10] for images x of shape [B, 1, 28, 28] with values in [0, 1]."""
        return self.head(self.dropout(self.features(x)))


def images_to_input(images_uint8: torch.Tensor | np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 MNIST images [B, 1, 28, 28] -> float32 classifier input in [0, 1] on `device`."""
    images = torch.as_tensor(images_uint8)
    if images.dtype != torch.uint8:
        raise ValueError(f"classifier input must be uint8 images in [0, 255], got dtype {images.dtype}")
    if images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"classifier input must have shape [B, 1, 28, 28] (MNIST), got {tuple(images.shape)}")
    return images.to(device=device, dtype=torch.float32) / PIXEL_MAX


def load_classifier(path: str | Path | None = None, device: torch.device | str = "cpu",
                    name: str = "mnist") -> MnistClassifier:
    """The shipped classifier ``name`` (or the safetensors file at `path`), in eval mode on `device`."""
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; shipped: {', '.join(CLASSIFIERS)}")
    weights_path = Path(path) if path else CLASSIFIERS[name]
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"MNIST classifier weights not found at {weights_path}; train them with "
            "`python -m evaluation.train_classifier`"
        )
    state = {name: tensor.float() if tensor.is_floating_point() else tensor
             for name, tensor in load_file(str(weights_path)).items()}
    classifier = MnistClassifier()
    classifier.load_state_dict(state, strict=True)
    return classifier.to(device).eval()


def classifier_report(path: str | Path = CLASSIFIER_REPORT) -> dict:
    """The JSON the training script wrote next to the weights (held-out accuracy etc.)."""
    return json.loads(Path(path).read_text())


def total_variation_from_uniform(histogram: np.ndarray) -> float:
    """TV(p, uniform) = 1/2 * sum_k |p_k - 1/K| for the normalised histogram p over K classes."""
    probabilities = histogram / histogram.sum()
    return float(0.5 * np.abs(probabilities - 1.0 / len(histogram)).sum())


class ClassifierMetrics:
    """Streaming classifier metrics over batches of uint8 MNIST images.

    The state is three sums (confidence, entropy, class counts) and an image count, so two
    instances merge by adding them (`merge`), and instances in several processes by summing
    their `to_arrays` (all_reduce) and `load_arrays` of the sum. Images drawn for requested
    classes (a class-conditional model) also count into a confusion matrix, rows = the class
    asked for, columns = the class recognised, from which the accuracy against the requested
    labels follows.
    """

    def __init__(self, classifier: nn.Module | None = None, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.classifier = (classifier if classifier is not None else load_classifier(device=self.device)).eval()
        self.count = 0
        self.confidence_sum = 0.0
        self.entropy_sum = 0.0
        self.class_histogram = np.zeros(NUM_CLASSES, dtype=np.int64)
        self.confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)

    @torch.no_grad()
    def update(self, images_uint8: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | None = None) -> None:
        """Add a batch of uint8 images [B, 1, 28, 28], with the classes they were drawn for
        (``labels`` [B], or None: unlabelled)."""
        log_probs = F.log_softmax(self.classifier(images_to_input(images_uint8, self.device)).double(), dim=1)
        probs = log_probs.exp()
        self.count += probs.shape[0]
        self.confidence_sum += probs.max(dim=1).values.sum().item()
        self.entropy_sum += -(probs * log_probs).sum().item()
        predicted = probs.argmax(dim=1).cpu().numpy()
        self.class_histogram += np.bincount(predicted, minlength=NUM_CLASSES)
        if labels is not None:
            requested = np.asarray(labels, dtype=np.int64)
            if (requested.shape != predicted.shape or requested.min(initial=0) < 0
                    or requested.max(initial=0) >= NUM_CLASSES):
                raise ValueError(f"labels must be {len(predicted)} classes in 0..{NUM_CLASSES - 1}, got {requested}")
            np.add.at(self.confusion, (requested, predicted), 1)

    def merge(self, other: "ClassifierMetrics") -> None:
        """Add another instance's counts (same classifier) into this one."""
        self.count += other.count
        self.confidence_sum += other.confidence_sum
        self.entropy_sum += other.entropy_sum
        self.class_histogram += other.class_histogram
        self.confusion += other.confusion

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The state as arrays (float64 sums, int64 counts) that add up over processes."""
        return {"count": np.asarray(self.count, dtype=np.int64),
                "sums": np.array([self.confidence_sum, self.entropy_sum]),
                "class_histogram": self.class_histogram.copy(), "confusion": self.confusion.copy()}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Take the state from ``arrays`` (e.g. `to_arrays` summed over processes)."""
        self.count = int(np.asarray(arrays["count"]))
        self.confidence_sum, self.entropy_sum = (float(value) for value in np.asarray(arrays["sums"]))
        self.class_histogram = np.asarray(arrays["class_histogram"], dtype=np.int64).copy()
        self.confusion = np.asarray(arrays["confusion"], dtype=np.int64).copy()

    def result(self) -> dict:
        """mean_confidence (mean max softmax), mean_entropy (nats, per image),
        class_histogram (10 counts), histogram_tv_from_uniform, num_images; for images drawn
        for requested classes also accuracy (recognised = requested), per_class_accuracy
        (None for a class never requested) and confusion (rows requested, columns recognised)."""
        if self.count == 0:
            raise ValueError("ClassifierMetrics.result() needs at least one image; call update() first")
        labelled = {}
        if self.confusion.sum():
            requested = self.confusion.sum(1)
            labelled = {"accuracy": float(np.trace(self.confusion) / self.confusion.sum()),
                        "per_class_accuracy": [float(self.confusion[k, k] / n) if n else None
                                               for k, n in enumerate(requested)],
                        "confusion": self.confusion.tolist()}
        return {**labelled,
            "num_images": self.count,
            "mean_confidence": self.confidence_sum / self.count,
            "mean_entropy": self.entropy_sum / self.count,
            "class_histogram": self.class_histogram.tolist(),
            "histogram_tv_from_uniform": total_variation_from_uniform(self.class_histogram),
        }


def classifier_metrics(
    images_uint8: torch.Tensor | np.ndarray,
    classifier: nn.Module | None = None,
    *,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    labels: torch.Tensor | np.ndarray | None = None,
) -> dict:
    """`ClassifierMetrics.result()` for a whole uint8 array [N, 1, 28, 28], in batches;
    ``labels`` [N]: the classes the images were drawn for (accuracy, confusion matrix)."""
    metrics = ClassifierMetrics(classifier, device)
    for start in range(0, len(images_uint8), batch_size):
        metrics.update(images_uint8[start:start + batch_size],
                       None if labels is None else labels[start:start + batch_size])
    return metrics.result()
