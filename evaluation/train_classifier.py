"""Train the MNIST classifier used for sample metrics: `python -m evaluation.train_classifier`.

The MNIST-10k protocol of the released models: train on the MNIST test split t10k (10,000
images) and measure accuracy on train5k (5,000 images of the MNIST training split, disjoint
from t10k); both ship in sde/assets/mnist. The
recipe is fixed in advance; the held-out accuracy is printed per epoch for the log only —
the weights written are those after the last epoch, never picked by held-out accuracy.

Writes evaluation/assets/mnist_classifier.safetensors (float16, cast to float32 on load)
and mnist_classifier.json with the held-out accuracy measured on the written weights.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from evaluation.classifier import (
    CLASSIFIER_REPORT,
    CLASSIFIER_WEIGHTS,
    MnistClassifier,
    images_to_input,
    load_classifier,
)
from sde import randomness
from sde.data import load_mnist

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Where the IDX files are looked for first; both splits ship inside the package (sde.data),
#: so an empty or missing folder reads the package's copies.
MNIST_DIR = REPO_ROOT / "data"
TRAIN_SPLIT = "test"  # t10k: the official MNIST test split, 10,000 images
HELD_OUT_SPLIT = "train5k"  # 5,000 images of the MNIST training split, none in t10k


def load_mnist_split(split: str, data_dir: str | Path = MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 1, 28, 28], labels int64 [N]) of an MNIST split, MD5-checked, no download
    (``sde.data.load_mnist``: both splits used here ship inside the package)."""
    images, labels = load_mnist(data_dir, split, download=False)
    return images.numpy(), labels.numpy()


def random_affine(
    x: torch.Tensor, generator: torch.Generator, *, max_degrees: float, max_shift_pixels: float, max_scale_change: float
) -> torch.Tensor:
    """Random rotation, isotropic scaling and translation of a batch [B, 1, H, W] with
    bilinear sampling and zero (background) fill."""
    batch, _, height, _ = x.shape
    def uniform(bound: float) -> torch.Tensor:
        return (2 * randomness.rand(batch, generator=generator) - 1) * bound
    angle = torch.deg2rad(uniform(max_degrees))
    scale = 1 + uniform(max_scale_change)
    shift = torch.stack([uniform(max_shift_pixels), uniform(max_shift_pixels)], dim=1) * 2 / height  # to [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def accuracy(classifier: torch.nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> float:
    """Fraction of `images` (uint8) whose arg-max class equals the label."""
    classifier.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = classifier(images_to_input(images[start:start + batch_size]))
        correct += (logits.argmax(1).numpy() == labels[start:start + batch_size]).sum()
    return correct / len(images)


def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train_images, train_labels = load_mnist_split(TRAIN_SPLIT, args.data_dir)
    test_images, test_labels = load_mnist_split(HELD_OUT_SPLIT, args.data_dir)
    inputs = images_to_input(train_images)
    targets = torch.from_numpy(train_labels)

    classifier = MnistClassifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(inputs) / args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    start_time = time.time()
    for epoch in range(args.epochs):
        classifier.train()
        order = randomness.randperm(len(inputs), generator=generator)
        loss_sum = 0.0
        for start in range(0, len(inputs), args.batch_size):
            index = order[start:start + args.batch_size]
            batch = random_affine(
                inputs[index], generator, max_degrees=args.max_degrees,
                max_shift_pixels=args.max_shift_pixels, max_scale_change=args.max_scale_change,
            )
            loss = F.cross_entropy(classifier(batch), targets[index], label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item() * len(index)
        held_out = accuracy(classifier, test_images, test_labels)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {loss_sum / len(inputs):.4f}  "
              f"train5k accuracy {held_out:.4f}  ({time.time() - start_time:.0f} s)", flush=True)

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: (tensor.half() if tensor.is_floating_point() else tensor).contiguous()
             for name, tensor in classifier.state_dict().items()}
    save_file(state, str(out_path))
    stored = load_classifier(out_path)
    report = {
        "train5k_accuracy": float(accuracy(stored, test_images, test_labels)),
        "trained_on": "MNIST t10k (10,000 images)",
        "evaluated_on": "MNIST train5k (5,000 images of the training split, disjoint from t10k)",
        "num_parameters": sum(p.numel() for p in stored.parameters()),
        "stored_dtype": "float16",
        "training_seconds": round(time.time() - start_time),
        "recipe": {key: value for key, value in vars(args).items() if key not in ("out", "report", "data_dir")},
        "torch_version": torch.__version__,
    }
    Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(MNIST_DIR), help="directory with t10k-* and train5k-* IDX files (default: the package's copies)")
    parser.add_argument("--out", default=str(CLASSIFIER_WEIGHTS))
    parser.add_argument("--report", default=str(CLASSIFIER_REPORT))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight_decay", type=float, default=5e-4)
    parser.add_argument("--label_smoothing", type=float, default=0.05)
    parser.add_argument("--max_degrees", type=float, default=12.0)
    parser.add_argument("--max_shift_pixels", type=float, default=2.5)
    parser.add_argument("--max_scale_change", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
