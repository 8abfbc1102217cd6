"""Load a trained network for sampling and evaluation: EMA weights from a run or a file."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sde import checkpoint
from sde.models import create_model, is_exact
from sde.workdir import Workdir


def load_ema_model(config, workdir: str | Path, device: torch.device,
                   path: str = "") -> tuple[torch.nn.Module, str, int | None]:
    """The EMA network in eval mode, with where it came from and its training step.

    ``path`` (``sampling.checkpoint``): a training checkpoint ``.pt`` (its EMA weights are
    used) or exported ``.safetensors`` weights; empty means the newest readable checkpoint
    in ``workdir/checkpoints``. The architecture must match the config exactly. The closed-form
    model (``model.name="exact"``) has no weights: it is returned as built, with step None.
    """
    model = create_model(config)
    if is_exact(config):
        if path:
            raise ValueError(f"model.name='exact' has no weights to load; leave sampling.checkpoint empty "
                             f"(got {path!r})")
        return (model.to(device).eval().requires_grad_(False),
                f"exact score of toy set {config.data.toy_name!r} under the {config.sde.name} SDE", None)
    if path:
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"sampling.checkpoint={path!r} does not exist; give a .pt "
                                    f"checkpoint or .safetensors weights, or leave it empty for "
                                    f"the latest checkpoint in the workdir")
        step = load_weights(model, config, source)
    else:
        run = Workdir(workdir, create=False)
        restored = checkpoint.load_latest(run.checkpoints)
        if restored is None:
            raise FileNotFoundError(f"no readable checkpoint in {run.checkpoints}; train first "
                                    f"(--mode train) or set --config.sampling.checkpoint=PATH")
        step, state = restored
        source = run.checkpoints / f"checkpoint_{step}.pt"
        checkpoint.load_model_weights(model, state["ema"], f"EMA weights of {source}")
    return model.to(device).eval().requires_grad_(False), str(source), step


def load_weights(model: torch.nn.Module, config, source: Path) -> int | None:
    """Load ``source`` into ``model``: exported ``.safetensors`` weights (checked against the
    config they were exported with) or the EMA weights of a training checkpoint ``.pt``.
    Returns the training step the weights come from (None if the file does not say)."""
    if source.suffix == ".safetensors":
        metadata = checkpoint.import_safetensors(model, source)
        check_exported_config(config, metadata, source)
        if "step" not in metadata:
            return None
        if not metadata["step"].isdigit():
            raise checkpoint.CheckpointError(f"{source}: its metadata's step {metadata['step']!r} is not a "
                                             f"step number; the file is damaged")
        return int(metadata["step"])
    state = checkpoint.load_checkpoint(source)
    checkpoint.load_model_weights(model, state["ema"], f"EMA weights of {source}")
    return int(state["step"])


#: Config groups that must agree between exported weights and the config that uses them:
#: the architecture (also checked key by key on load) and the SDE the network was trained for.
MATCHING_GROUPS = ("sde", "model")
#: Keys of those groups that do not change what the weights mean.
FREE_KEYS = {"model": ("dropout", "ema_rate")}


def check_exported_config(config, metadata: dict[str, str], source: Path) -> None:
    """Refuse weights whose export-time SDE or model config differs from ``config``.

    An eps-network trained for one SDE samples noise under another with no error; the
    config stored by ``--mode export`` lets that be caught with the differing keys named.
    """
    if "config" not in metadata:
        return
    try:
        exported = json.loads(metadata["config"])
        groups = {group: dict(exported[group]) for group in MATCHING_GROUPS if group in exported}
    except (ValueError, TypeError) as error:
        raise checkpoint.CheckpointError(f"{source}: the config in its metadata is damaged "
                                         f"({type(error).__name__}: {error})") from error
    differences = []
    for group in MATCHING_GROUPS:
        for key, value in config[group].to_dict().items():
            if key in FREE_KEYS.get(group, ()) or key not in groups.get(group, {}):
                continue
            trained = groups[group][key]
            if (list(value) if isinstance(value, tuple) else value) != trained:
                differences.append(f"{group}.{key}={value!r} (weights: {trained!r})")
    if differences:
        raise ValueError(f"{source} was trained with a different config: {'; '.join(differences)}; "
                         f"use the config it was exported with (its metadata holds it)")
