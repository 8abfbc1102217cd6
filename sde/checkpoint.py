"""Crash-safe checkpoints: atomic writes, the last K kept, corrupt files skipped.

A checkpoint is ``workdir/checkpoints/checkpoint_<step>.pt``, a dict of tensors and plain
containers written by ``torch.save`` to a temporary file in the same directory, flushed,
fsync'ed and renamed over the final name (rename is atomic on POSIX), then the directory
is fsync'ed. A reader therefore sees either the whole previous file or the whole new one.
Loading uses ``torch.load(weights_only=True)``: a file that carries pickled code is refused.
Exported weights (EMA) go to safetensors.

Neither format checks its bytes on load (torch does not verify the zip CRCs, safetensors has
no checksum), so a flipped bit loads as a changed weight. Both therefore carry a SHA-256
digest of their content (``content_digest``), recorded when written and verified when read:
a checkpoint whose content no longer matches is skipped like a truncated one, weights are
refused. Files written before digests existed load with a note. Loaded content is also
checked for its structure and for finite weights (``check_structure``, ``check_finite``).
"""
from __future__ import annotations

import hashlib
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


#: Temporary files of ``atomic_write``: ``.<name>.<writer pid>.<random>.tmp``.
_TEMPORARY = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


def atomic_write(path: Path, write) -> None:
    """Call ``write(file_object)`` on a temp file next to ``path``, fsync, rename over ``path``.

    The temp file's name holds the writer's process id, so that a later process removes
    only the leftovers of writers that are gone (``remove_orphans``), never a live one's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.filename is None:  # e.g. a full disk: name the file
            raise OSError(error.errno, f"{error.strerror or error}; nothing was written, the file's "
                                       f"previous version (if any) is kept", str(path)) from error
        raise


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_orphans(directory: Path) -> list[Path]:
    """Remove the temporary files that writers which no longer run left in ``directory``
    (killed mid-write); a live process's files, including this one's, are left alone."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for name in os.listdir(directory):
        match = _TEMPORARY.match(name)
        if match and not _alive(int(match.group(1))):
            (directory / name).unlink(missing_ok=True)
            removed.append(directory / name)
    return removed


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
    signed = {**state, DIGEST_KEY: content_digest(state)}
    atomic_write(path, lambda handle: torch.save(signed, handle))
    # Files of later steps exist only if they were unreadable at resume: they must not
    # count among the newest ``keep`` (that would evict good checkpoints); training
    # overwrites them when it reaches their step.
    not_newer = [old for saved_step, old in list_checkpoints(directory) if saved_step <= step]
    for old in not_newer[:-keep]:
        old.unlink(missing_ok=True)
    remove_orphans(directory)  # of writes killed midway (SIGKILL)
    return path


#: The checkpoint entry, and the safetensors metadata key, that hold the content's digest.
DIGEST_KEY = "sha256"


def _feed(hasher, value: Any) -> None:
    """Feed ``value`` (tensors in nested dicts, lists, tuples and plain scalars) to ``hasher``
    in a canonical order, each item tagged with its type, so that equal content gives equal
    bytes and any change of a key, dtype, shape, byte or scalar gives others."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        hasher.update(f"T{value.dtype!s}{tuple(value.shape)}:".encode())
        hasher.update(tensor.view(torch.uint8).numpy() if tensor.numel() else b"")
    elif isinstance(value, dict):
        hasher.update(f"D{len(value)}:".encode())
        for key in sorted(value, key=lambda k: (type(k).__name__, str(k))):
            _feed(hasher, key)
            _feed(hasher, value[key])
    elif isinstance(value, (list, tuple)):
        hasher.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}:".encode())
        for item in value:
            _feed(hasher, item)
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        hasher.update(f"{type(value).__name__}:{value!r};".encode())
    else:
        raise TypeError(f"cannot digest a {type(value).__name__} (checkpoints hold tensors and plain containers)")


def content_digest(value: Any) -> str:
    """SHA-256 of ``value``'s content (``_feed``), as ``sha256:<hex>``."""
    hasher = hashlib.sha256()
    _feed(hasher, value)
    return f"sha256:{hasher.hexdigest()}"


#: Entries a training checkpoint holds; sampling and export need only ``"ema"`` and ``"step"``.
TRAINING_ENTRIES = ("model", "ema", "optimizer", "step", "data", "rng")
WEIGHT_ENTRIES = ("ema", "step")


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """CheckpointError naming the first floating-point tensor of ``tensors`` that holds a NaN
    or an infinity: such weights give NaN images with no other error."""
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{source}: {name} holds {bad} non-finite values (NaN or inf) of "
                                  f"{tensor.numel()}; the weights are unusable")


def check_structure(state: Any, path: Path, required: tuple[str, ...]) -> None:
    """CheckpointError unless ``state`` is a checkpoint dict holding ``required`` entries of the
    right kinds, with finite network weights."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint (a dict of "
                              f"{', '.join(required)})")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint of this toolkit: it lacks "
                              f"{', '.join(repr(k) for k in missing)}")
    for key in ("model", "ema", "optimizer", "data", "rng"):
        if key in required and not isinstance(state[key], dict):
            raise CheckpointError(f"{path}: its {key!r} entry is a {type(state[key]).__name__}, not a dict")
    if "step" in required and (isinstance(state["step"], bool) or not isinstance(state["step"], int)
                               or state["step"] < 0):
        raise CheckpointError(f"{path}: its step {state['step']!r} is not a step number")
    for key in ("model", "ema"):
        if key in required:
            if not all(isinstance(v, torch.Tensor) for v in state[key].values()):
                raise CheckpointError(f"{path}: its {key!r} entry holds values that are not tensors")
            check_finite(state[key], f"{path} ({key} weights)")


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


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu",
                    required: tuple[str, ...] = WEIGHT_ENTRIES) -> dict[str, Any]:
    """Load one checkpoint safely (weights only); CheckpointError if unreadable, unsafe,
    damaged (its content does not match its digest), without the ``required`` entries, or
    with non-finite network weights.

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
    signed = isinstance(state, dict) and DIGEST_KEY in state
    if signed and state.pop(DIGEST_KEY) != content_digest(state):
        raise CheckpointError(f"checkpoint {path} is damaged: its content does not match the SHA-256 "
                              f"digest recorded when it was written")
    check_structure(state, Path(path), required)
    if not signed:
        log.info("checkpoint %s carries no digest (written before digests were recorded); "
                 "its content cannot be verified", path)
    if torch.device(map_location).type == "cpu":
        return state
    return {key: value if key in CPU_ENTRIES else _to_device(value, map_location) for key, value in state.items()}


def load_latest(directory: Path, map_location: str | torch.device = "cpu",
                required: tuple[str, ...] = WEIGHT_ENTRIES) -> tuple[int, dict[str, Any]] | None:
    """Newest usable checkpoint as (step, state); corrupt, damaged or incomplete ones are
    skipped with a warning (``load_checkpoint``). A file removed while this looks (a trainer
    beside this process rotating its checkpoints) is passed over silently."""
    for step, path in reversed(list_checkpoints(directory)):
        try:
            state = load_checkpoint(path, map_location, required)
        except CheckpointError as error:
            if path.exists():
                log.warning("skipping corrupt checkpoint: %s", error)
            continue
        if state.get("step", step) != step:
            log.warning("skipping corrupt checkpoint: %s holds step %s, its name says %d", path, state["step"], step)
            continue
        return step, state
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
    metadata = {key: value for key, value in (metadata or {}).items() if key != DIGEST_KEY}
    payload = save(tensors, metadata={**metadata, DIGEST_KEY: weights_digest(tensors, metadata)})
    atomic_write(Path(path), lambda handle: handle.write(payload))


def weights_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """The digest of exported weights: their tensors and every metadata entry but the digest."""
    return content_digest({"tensors": tensors,
                           "metadata": {k: v for k, v in metadata.items() if k != DIGEST_KEY}})


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
    verify_weights(tensors, metadata, Path(path))
    load_model_weights(module, tensors, str(path))
    return metadata


def verify_weights(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """CheckpointError if exported weights do not match their recorded digest or hold
    non-finite values; a file without a digest (written before digests) passes with a note."""
    if DIGEST_KEY in metadata and metadata[DIGEST_KEY] != weights_digest(tensors, metadata):
        raise CheckpointError(f"weights {path} are damaged: their content does not match the SHA-256 "
                              f"digest recorded when they were exported")
    check_finite(tensors, f"weights {path}")
    if DIGEST_KEY not in metadata:
        log.info("weights %s carry no digest (exported before digests were recorded); their content "
                 "cannot be verified", path)
