"""The run directory: ``config.json``, ``checkpoints/``, ``tb/``, ``samples/``, ``eval/``,
``compare/``, ``schedules/``."""
from __future__ import annotations

import json
import os
from pathlib import Path

from sde.checkpoint import atomic_write


class WorkdirError(ValueError):
    """The workdir cannot be used (not writable, or not a directory)."""


class Workdir:
    """Paths of one run; ``create=True`` makes the directory and checks that it is writable."""

    def __init__(self, root: str | Path, create: bool = True):
        self.root = Path(root)
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise WorkdirError(f"workdir {self.root} cannot be created: {error.strerror}") from error
            if not self.root.is_dir():
                raise WorkdirError(f"workdir {self.root} exists but is not a directory")
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise WorkdirError(f"workdir {self.root} is not writable; pass a --workdir you can write to")

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    def _sub(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def samples(self) -> Path:
        return self._sub("samples")

    @property
    def eval(self) -> Path:
        return self._sub("eval")

    @property
    def compare(self) -> Path:
        return self._sub("compare")

    @property
    def schedules(self) -> Path:
        return self._sub("schedules")

    def write_config(self, config, environment: dict | None = None) -> None:
        """Freeze the resolved config into ``config.json`` (atomically), with what the run
        ran on under ``"environment"`` (``sde.environment``; not a config key)."""
        self.write_json("config.json", {**config.to_dict(), **({"environment": environment} if environment else {})})

    def write_json(self, name: str, payload: dict) -> Path:
        """Write ``payload`` as indented JSON to ``root/name`` (atomically); returns the path."""
        encoded = json.dumps(payload, indent=2, sort_keys=True, default=list).encode()
        path = self.root / name
        atomic_write(path, lambda handle: handle.write(encoded))
        return path
