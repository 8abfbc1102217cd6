"""``--mode export``: the EMA weights of a run as safetensors, with the config they need.

Writes ``workdir/export/ema_step<step>.safetensors`` from the newest readable checkpoint
(or ``sampling.checkpoint``, a ``.pt``). The file's metadata holds the training step, the
resolved config (JSON) and, when the run wrote one, its training summary, so the weights
carry what is needed to use them; ``sampling.checkpoint=<file>`` then runs
``--mode sample``, ``eval`` and ``compare`` on them with no workdir or training.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sde import checkpoint, configuration, environment
from sde.checks import require
from sde.inference import load_ema_model
from sde.models import is_exact
from sde.workdir import Workdir


def check(config) -> None:
    """The config of an export: one clear ValueError on the first problem."""
    configuration.validate(config)
    require(not is_exact(config), "model.name='exact' is a closed form with no weights to export")
    if config.sampling.checkpoint.endswith(".safetensors"):
        raise ValueError(f"sampling.checkpoint={config.sampling.checkpoint!r} is already exported "
                         f"weights; give a .pt checkpoint or leave it empty for the workdir's newest")
    configuration.check_sampling(config)  # the sampler the weights' users get by default


def portable_path(path: str | Path, run_dir: Path) -> str:
    """``path`` as exported weights record it: relative to the current directory when inside
    it (a repository-relative path), else relative to the run directory, else its name alone,
    so that the file names no directory of the machine it was made on."""
    path = Path(path).resolve()
    for base in (Path.cwd().resolve(), run_dir.resolve()):
        if path.is_relative_to(base):
            return str(path.relative_to(base))
    return path.name


def run(config, workdir: str | Path) -> dict[str, Any]:
    """``--mode export``: check the config, then export (``export``)."""
    check(config)
    return export(config, workdir)


def export(config, workdir: str | Path) -> dict[str, Any]:
    """Run ``--mode export``; returns the path written and its metadata."""
    run = Workdir(workdir)
    model, source, step = load_ema_model(config, workdir, torch.device("cpu"),
                                         config.sampling.checkpoint)
    environment.announce(torch.device("cpu"), model=model)  # exporting copies weights on the CPU
    metadata = {"step": str(step), "source": portable_path(source, run.root),
                "config": json.dumps(config.to_dict(), sort_keys=True, default=list)}
    summary_path = run.root / "train_summary.json"
    if summary_path.is_file():
        metadata["train_summary"] = summary_path.read_text()
    path = run.root / "export" / f"ema_step{step}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.export_safetensors(model, path, metadata)
    size_mb = path.stat().st_size / 2**20
    return {"path": str(path), "step": step, "size_mb": size_mb,
            "message": f"exported the EMA weights of {source} (step {step}) to {path} ({size_mb:.1f} MB)"}
