"""The run directory: ``config.json``, ``checkpoints/``, ``tb/``, ``samples/``, ``eval/``,
``compare/``, ``schedules/``."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from sde.checkpoint import atomic_write, remove_orphans

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one trainer per workdir is then the user's care
    fcntl = None


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
            remove_orphans(self.root)  # config.json / summaries of writers that were killed

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    def _sub(self, name: str) -> Path:
        """``root/name``, created, without the temporary files of writers that are gone."""
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        remove_orphans(path)
        return path

    def prepare_checkpoints(self) -> None:
        """Create ``checkpoints/``, remove what killed writers left there, and make sure a file
        can be written in it now rather than at the first save (a WorkdirError naming it)."""
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            remove_orphans(self.checkpoints)
            atomic_write(self.checkpoints / ".write_test", lambda handle: handle.write(b"ok"))
            os.unlink(self.checkpoints / ".write_test")
        except OSError as error:
            raise WorkdirError(f"cannot write checkpoints in {self.checkpoints}: "
                               f"{error.strerror or error}") from error

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

    @property
    def latent(self) -> Path:
        return self._sub("latent")

    @property
    def inverse(self) -> Path:
        return self._sub("inverse")

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


class TrainingLock:
    """One trainer per workdir: an exclusive advisory lock (``flock``) on ``root/train.lock``.

    The operating system releases the lock when its holder ends, however it ends (SIGKILL
    included), so a dead trainer never leaves a stale lock; the file itself stays and says
    who held it last. Processes that only read the run (sample, eval, compare) do not lock.
    """

    NAME = "train.lock"

    def __init__(self, root: Path):
        self.path = Path(root) / self.NAME
        self._handle = None

    def acquire(self) -> None:
        """Take the lock, or raise WorkdirError naming the process that holds it."""
        if fcntl is None:
            return
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise WorkdirError(f"workdir {self.path.parent} is being trained by {holder}; one trainer per "
                               f"workdir: wait for it to finish, stop it (SIGTERM saves a checkpoint), or "
                               f"pass another --workdir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}, started "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
