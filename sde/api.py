"""The toolkit from Python: ``sde.load(path)`` rebuilds a trained model from its file alone.

    import sde
    pipe = sde.load("release/mnist_vp_release.safetensors")
    x, info = pipe.sample(16, method="dpm_solver", steps=20)       # float in [-1, 1]
    images = pipe.to_uint8(x)                                      # uint8 [16, 1, 28, 28]
    heldout, _ = pipe.dataset("train5k")                           # sorted by class
    mean, standard_error, _ = pipe.bits_per_dim(heldout[::500])    # one digit of each class

    toy = sde.exact_toy("two_gaussians_1d")                        # the true score, no training
    toy.flow_figure("flow.png", method="euler_maruyama", steps=500)  # forward and reverse pictures

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

from sde import checkpoint, conditioning, data, likelihood
from sde.checkpoint import CheckpointError
from sde.configuration import sampler_options
from sde.distributed import resolve_device
from sde.generation import generate
from sde.inference import load_ema_model
from sde.sdes import SDE, create_sde

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


def _stored_config(path: Path) -> ml_collections.ConfigDict:
    """The config stored with ``path``: in the metadata of exported ``.safetensors`` weights,
    or in the ``config.json`` of the run that a run directory or checkpoint ``.pt`` belongs to."""
    if path.suffix == ".safetensors":
        source, text = path, checkpoint.read_safetensors_metadata(path).get("config")
        if text is None:
            raise ValueError(f"{path} holds no config in its metadata; pass config= (the one it was trained with)")
    else:
        source = (path if path.is_dir() else path.parent.parent) / "config.json"  # <run>/checkpoints/<file>.pt
        if not source.is_file():
            raise FileNotFoundError(f"{source} not found: give exported .safetensors weights, a run "
                                    f"directory or one of its checkpoints, or pass config=")
        text = source.read_text()
    try:
        stored = json.loads(text)
        if not isinstance(stored, dict):
            raise TypeError(f"a JSON {type(stored).__name__}, not an object")
        return config_from_dict(stored)
    except (ValueError, TypeError, AttributeError) as error:
        raise CheckpointError(f"the config stored in {source} is damaged ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); pass config=") from error


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

    @property
    def num_classes(self) -> int:
        """Class labels the network takes (0: unconditional)."""
        return conditioning.num_classes(self.model)

    def sample(self, num_samples: int, *, method: str | None = None, steps: int | None = None,
               seed: int = 0, batch_size: int | None = None, progress: bool = False,
               labels=None, guidance: float = 0.0, **options) -> tuple[Tensor, dict[str, Any]]:
        """``num_samples`` samples and the sampler's ``info`` (of the last batch).

        A class-conditional model takes ``labels``: one class for all, ``"balanced"`` (sample
        k of class k mod K), or one per sample (a list or tensor); None draws the
        unconditional law. ``guidance`` is w of classifier-free guidance (each guided step
        evaluates the network twice per sample; ``info["nfe"]`` counts both).

        ``method`` and ``steps`` default to the config's (``sampling.method``/``steps``);
        ``options`` are the sampler's (``samplers.SAMPLERS[method].options``), by default the
        config's ``sampling.options`` when ``method`` is the config's. Sample k comes from
        generator (seed, k), as in ``--mode sample``: the same images for the same seed,
        whatever ``batch_size`` (up to the float rounding of batched network calls).
        """
        config = self.config.copy_and_resolve_references()
        for name, value in (("num_samples", num_samples), ("steps", steps), ("batch_size", batch_size)):
            if (value is not None or name == "num_samples") and (
                    isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if method is None or method == config.sampling.method:
            method, options = config.sampling.method, {**sampler_options(config), **options}
        steps = config.sampling.steps if steps is None else steps
        config.sampling.batch_size = batch_size or min(num_samples, config.sampling.batch_size)
        guidance = conditioning.check_guidance(guidance)
        if guidance and not self.num_classes:
            raise ValueError("guidance needs a class-conditional model; this one is unconditional")
        labels = conditioning.resolve_labels(labels, num_samples, self.num_classes, name="labels",
                                             trained=tuple(self.config.data.classes))
        if guidance and labels is None:
            raise ValueError("guidance guides towards a class: give labels too")
        batches, info = [], {}
        for _, x, info in generate(config, self.model, self.sde, self.device, num_samples=num_samples,
                                   seed=seed, method=method, steps=steps, options=options,
                                   progress=progress, labels=labels, guidance=guidance):
            batches.append(x)
        return torch.cat(batches), info

    def to_uint8(self, x: Tensor) -> Tensor:
        """Samples as 8-bit images on the CPU (the inverse of the data's scaling)."""
        return data.float_to_uint8(x.float().cpu(), dequantized=self.config.data.dequantize)

    def to_float(self, images: Tensor) -> Tensor:
        """8-bit images as the model's input on its device (the data's scaling, no dequantization)."""
        return data.uint8_to_float(images, dequantize=False).to(self.device)

    def dataset(self, split: str | None = None) -> tuple[Tensor, Tensor | None]:
        """The model's data set, ``split`` (default: the one it was trained on), raw."""
        return data.load_dataset(self.config, split)

    def bits_per_dim(self, images: Tensor, labels=None, **options) -> tuple[float, float, dict]:
        """Bits/dim of uint8 images by the probability-flow ODE (``likelihood.bits_per_dim``):
        (mean, standard error, info). The dequantization is the config's (``eval.bpd_*``),
        as ``--mode eval`` reports it, unless ``options`` say otherwise. A class-conditional
        model with ``labels`` (one per image) gives -log2 p(x | y) per dimension; without, the
        unconditional p(x) of the same network (the null label)."""
        options.setdefault("dequantization", self.config.eval.bpd_dequantization)
        options.setdefault("truncation", self.config.eval.bpd_truncation)
        labels = conditioning.resolve_labels(labels, len(images), self.num_classes, name="labels")
        return likelihood.bits_per_dim(self.model, self.sde, images.to(self.device), labels=labels,
                                       dequantized_grid=self.config.data.dequantize, **options)

    def flow_figure(self, path: str | Path, *, method: str | None = None, steps: int | None = None,
                    seed: int = 0, **options) -> Path:
        """Point data only: the data noised forward and sampled back by ``method`` (default:
        the config's sampler and its options), as ``--mode sample`` draws it
        (``sde.toy_figures``); returns the PNG's path."""
        from sde import toy_figures

        if data.get_dataset(self.config.data.dataset).is_image:
            raise ValueError("flow_figure draws point data (data.dataset='toy'); for images use "
                             "--mode sample with sampling.save_trajectory=True")
        config = self.config.copy_and_resolve_references()
        if method is None or method == config.sampling.method:
            options = {**sampler_options(config), **options}
        config.sampling.method = method or config.sampling.method
        config.sampling.steps = steps or config.sampling.steps
        config.sampling.seed = seed
        toy_figures.flow_figure(config, self.model, self.sde, self.device, options, Path(path))
        return Path(path)

    def elbo_bits_per_dim(self, images: Tensor, **options) -> tuple[float, float, dict]:
        """Bits/dim of uint8 images by the ELBO of the model's training objective
        (``likelihood.elbo_bits_per_dim``): (mean, standard error, info)."""
        return likelihood.elbo_bits_per_dim(self.model, self.sde, images.to(self.device),
                                            continuous=self.config.training.continuous, **options)


def load(path: str | Path, *, device: str | torch.device = "cpu",
         config: ml_collections.ConfigDict | None = None) -> Pipeline:
    """Rebuild a trained model from ``path``: exported ``.safetensors`` weights, a run
    directory (its newest readable checkpoint) or a checkpoint ``.pt`` of a run; EMA weights,
    in eval mode on ``device`` ("auto": CUDA when available). ``config`` replaces the stored
    one (for weights saved without it)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give exported .safetensors weights, a run "
                                f"directory or a checkpoint .pt")
    config = _stored_config(path) if config is None else config
    model, source, step = load_ema_model(config, path if path.is_dir() else "",
                                         resolve_device(str(device)), "" if path.is_dir() else str(path))
    return Pipeline(model=model, sde=create_sde(config), config=config, source=source, step=step)


def exact_toy(name: str, *, sde: str = "vp", device: str | torch.device = "cpu") -> Pipeline:
    """The exact score of toy set ``name`` (one with a closed form: ``data.CLOSED_FORM_NAMES``)
    under SDE ``sde`` as a ``Pipeline``: every sampler, likelihood and picture runs on the true
    reverse process, with nothing trained (``model.name = "exact"``, ``sde.models.exact``)."""
    from configs.toy_vp import get_config

    config = get_config()
    config.model.name, config.data.toy_name, config.sde.name = "exact", name, sde
    model, source, step = load_ema_model(config, "", resolve_device(str(device)))
    return Pipeline(model=model, sde=create_sde(config), config=config, source=source, step=step)


__all__ = ["Pipeline", "config_from_dict", "exact_toy", "load"]
