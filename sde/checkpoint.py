"""Crash-safe checkpoints: atomic writes, the last K kept, corrupt files skipped.

A checkpoint is ``workdir/checkpoints/checkpoint_<step>.pt``, a dict of tensors and plain
containers written by ``torch.save`` to a temporary file in the same directory, flushed,
fsync'ed and renamed over the final name (rename is atomic on POSIX), then the directory
is fsync'ed. A reader therefore sees either the whole previous file or the whole new one.
Loading uses ``torch.load(weights_only=True)``: a file that carries pickled code is refused.
Exported weights (EMA) go to safetensors.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (corrupt, unsafe, or of another architecture)."""


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call ``write(file_object)`` on a temp file next to ``path``, fsync, rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"checkpoint_{step}.pt"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), directory / name)
             for name in os.listdir(directory) if (m := _NAME.match(name))]
    return sorted(found)


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Atomically write ``state`` as the checkpoint of ``step``; keep the newest ``keep`` files."""
    if keep < 1:
        raise ValueError(f"training.keep_checkpoints must be >= 1, got {keep}")
    path = checkpoint_path(directory, step)
    atomic_write(path, lambda handle: torch.save(state, handle))
    # Files of later steps exist only if they were unreadable at resume: they must not
    # count among the newest ``keep`` (that would evict good checkpoints); training
    # overwrites them when it reaches their step.
    not_newer = [old for saved_step, old in list_checkpoints(directory) if saved_step <= step]
    for old in not_newer[:-keep]:
        old.unlink(missing_ok=True)
    for orphan in Path(directory).glob(".checkpoint_*.tmp"):  # of writes killed midway (SIGKILL)
        orphan.unlink(missing_ok=True)
    return path


#: Top-level entries of a checkpoint that stay on the CPU whatever ``map_location`` says:
#: generator states are CPU byte tensors (``sde.randomness``).
CPU_ENTRIES = ("rng",)


def _to_device(value: Any, device: str | torch.device) -> Any:
    """``value`` with every tensor in it (through dicts, lists and tuples) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(item, device) for item in value)
    return value


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one checkpoint safely (weights only); CheckpointError if unreadable or unsafe.

    Tensors go to ``map_location``, except the ``CPU_ENTRIES`` (RNG states), which stay on
    the CPU, where ``torch.set_rng_state`` and ``Generator.set_state`` take them."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # torch's text advises weights_only=False: not here
        detail = next((line.strip() for line in str(error).splitlines()
                       if "GLOBAL" in line or line.strip().startswith("Unsupported")), "")
        raise CheckpointError(f"cannot load checkpoint {path}: refused by torch.load(weights_only=True), it is "
                              f"corrupt or holds more than tensors and plain containers (e.g. pickled code)"
                              + (f": {detail}" if detail else "")) from error
    except Exception as error:  # torch raises many types for truncated / foreign files
        reason = str(error).splitlines()[0] if str(error) else "unexpected end of file"
        raise CheckpointError(f"cannot load checkpoint {path}: {type(error).__name__}: {reason}") from error
    if torch.device(map_location).type == "cpu" or not isinstance(state, dict):
        return state
    return {key: value if key in CPU_ENTRIES else _to_device(value, map_location) for key, value in state.items()}


def load_latest(directory: Path, map_location: str | torch.device = "cpu"
                ) -> tuple[int, dict[str, Any]] | None:
    """Newest readable checkpoint as (step, state); corrupt ones are skipped with a warning."""
    for step, path in reversed(list_checkpoints(directory)):
        try:
            return step, load_checkpoint(path, map_location)
        except CheckpointError as error:
            log.warning("skipping corrupt checkpoint: %s", error)
    return None


def load_model_weights(module: torch.nn.Module, state_dict: dict[str, torch.Tensor],
                       source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the mismatched keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong_shape:
        def head(keys):
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        parts = [f"{label}: {head(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape differs", wrong_shape)) if keys]
        raise CheckpointError(f"{source} does not match the configured model architecture ("
                              + "; ".join(parts) + "); check config.model against the run's config.json")
    module.load_state_dict(state_dict, strict=True)


def export_safetensors(module: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a module's weights (e.g. the EMA model) as safetensors, atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    payload = save(tensors, metadata=metadata)
    atomic_write(Path(path), lambda handle: handle.write(payload))


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file (its header only; no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception as error:
        raise CheckpointError(f"cannot read safetensors weights {path}: {error}") from error


def import_safetensors(module: torch.nn.Module, path: Path) -> dict[str, str]:
    """Load safetensors weights into ``module`` (strict); returns the file's metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:
        raise CheckpointError(f"cannot read safetensors weights {path}: {error}") from error
    load_model_weights(module, tensors, str(path))
    return metadata
