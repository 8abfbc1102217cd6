"""The toolkit from Python: ``sde.load(path)`` rebuilds a trained model from its file alone.

    import sde
    pipe = sde.load("release/mnist_vp_release.safetensors")
    x, info = pipe.sample(16, method="dpm_solver", steps=20)       # float in [-1, 1]
    images = pipe.to_uint8(x)                                      # uint8 [16, 1, 28, 28]
    heldout, _ = pipe.dataset("train5k")
    mean, standard_error, _ = pipe.bits_per_dim(heldout[:8])

Exported weights (``--mode export``, the released files) carry the resolved config they
were trained with, so the network, the SDE and the data's scaling come back exactly; a run
directory carries it in ``config.json`` beside its checkpoints. The samplers, likelihoods and
metrics are the ones the command line uses (``samplers.sample``, ``likelihood``,
``evaluation.image_fid``), so numbers agree with the modes' at the same settings.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_collections
import torch

from sde import checkpoint, data, likelihood
from sde.configuration import sampler_options
from sde.generation import generate
from sde.inference import load_weights
from sde.models import create_model
from sde.sdes import SDE, create_sde
from sde.workdir import Workdir

Tensor = torch.Tensor


def config_from_dict(stored: dict[str, Any]) -> ml_collections.ConfigDict:
    """The default config with ``stored``'s values over it: keys added to the toolkit since
    the file was written keep their defaults, keys it no longer has are dropped."""
    from configs.default import get_default_config

    def merge(target: ml_collections.ConfigDict, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if key not in target:
                continue
            if isinstance(target[key], ml_collections.ConfigDict) and isinstance(value, dict):
                merge(target[key], value)
            elif isinstance(target[key], tuple) and isinstance(value, list):
                target[key] = tuple(value)
            else:
                target[key] = value

    config = get_default_config()
    merge(config, stored)
    return config


def _config_of(path: Path) -> tuple[ml_collections.ConfigDict, Path]:
    """The config stored with ``path`` and the weights file to load: exported ``.safetensors``
    (config in its metadata), a checkpoint ``.pt`` of a run, or the run directory itself
    (its newest readable checkpoint), both with the run's ``config.json``."""
    if path.suffix == ".safetensors":
        metadata = checkpoint.read_safetensors_metadata(path)
        if "config" not in metadata:
            raise ValueError(f"{path} holds no config in its metadata; pass config= (the one it was trained with)")
        return config_from_dict(json.loads(metadata["config"])), path
    run_dir = path if path.is_dir() else path.parent.parent  # <run>/checkpoints/checkpoint_<step>.pt
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: give exported .safetensors weights, a run "
                                f"directory or one of its checkpoints, or pass config=")
    config = config_from_dict(json.loads(config_file.read_text()))
    if path.is_dir():
        restored = checkpoint.list_checkpoints(Workdir(path, create=False).checkpoints)
        if not restored:
            raise FileNotFoundError(f"no checkpoint in {path / 'checkpoints'}; train first (--mode train)")
        return config, restored[-1][1]
    return config, path


@dataclass
class Pipeline:
    """A trained network with what it needs: ``model`` (eval mode, EMA weights), ``sde``,
    ``config`` (the resolved training config) and where the weights came from."""

    model: torch.nn.Module
    sde: SDE
    config: ml_collections.ConfigDict
    source: str
    step: int | None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one example, e.g. (1, 28, 28)."""
        return data.sample_shape(self.config, 1)[1:]

    def sample(self, num_samples: int, *, method: str | None = None, steps: int | None = None,
               seed: int = 0, batch_size: int | None = None, progress: bool = False,
               **options) -> tuple[Tensor, dict[str, Any]]:
        """``num_samples`` samples and the sampler's ``info`` (of the last batch).

        ``method`` and ``steps`` default to the config's (``sampling.method``/``steps``);
        ``options`` are the sampler's (``samplers.SAMPLERS[method].options``), by default the
        config's ``sampling.options`` when ``method`` is the config's. Sample k comes from
        generator (seed, k), as in ``--mode sample``: the same images for the same seed,
        whatever ``batch_size``.
        """
        config = self.config.copy_and_resolve_references()
        if method is None:
            method, options = config.sampling.method, {**sampler_options(config), **options}
        steps = steps or config.sampling.steps
        config.sampling.batch_size = batch_size or min(num_samples, config.sampling.batch_size)
        batches, info = [], {}
        for _, x, info in generate(config, self.model, self.sde, self.device, num_samples=num_samples,
                                   seed=seed, method=method, steps=steps, options=options,
                                   progress=progress):
            batches.append(x)
        return torch.cat(batches), info

    def to_uint8(self, x: Tensor) -> Tensor:
        """Samples as 8-bit images on the CPU (the inverse of the data's scaling)."""
        return data.float_to_uint8(x.float().cpu(), dequantized=self.config.data.dequantize)

    def dataset(self, split: str | None = None) -> tuple[Tensor, Tensor | None]:
        """The model's data set, ``split`` (default: the one it was trained on), raw."""
        return data.load_dataset(self.config, split)

    def bits_per_dim(self, images: Tensor, **options) -> tuple[float, float, dict]:
        """Bits/dim of uint8 images by the probability-flow ODE (``likelihood.bits_per_dim``):
        (mean, standard error, info)."""
        return likelihood.bits_per_dim(self.model, self.sde, images.to(self.device),
                                       dequantized_grid=self.config.data.dequantize, **options)

    def elbo_bits_per_dim(self, images: Tensor, **options) -> tuple[float, float, dict]:
        """Bits/dim of uint8 images by the ELBO of the model's training objective
        (``likelihood.elbo_bits_per_dim``): (mean, standard error, info)."""
        return likelihood.elbo_bits_per_dim(self.model, self.sde, images.to(self.device),
                                            continuous=self.config.training.continuous, **options)


def load(path: str | Path, *, device: str | torch.device = "cpu",
         config: ml_collections.ConfigDict | None = None) -> Pipeline:
    """Rebuild a trained model from ``path``: exported ``.safetensors`` weights, a run
    directory (its newest checkpoint) or a checkpoint ``.pt`` of a run; EMA weights, in
    eval mode on ``device``. ``config`` overrides the stored one (weights without it)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give exported .safetensors weights, a run "
                                f"directory or a checkpoint .pt")
    stored, weights = _config_of(path) if config is None else (config, path)
    model = create_model(stored)
    step = load_weights(model, stored, weights)
    model = model.to(device).eval().requires_grad_(False)
    return Pipeline(model=model, sde=create_sde(stored), config=stored, source=str(weights), step=step)


__all__ = ["Pipeline", "config_from_dict", "load"]
