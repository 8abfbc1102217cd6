"""``--mode export``: safetensors weights that carry their config, and refuse a wrong one."""
import json

import pytest
import torch
from safetensors import safe_open

from main import run_mode
from sde.inference import load_ema_model
from sde.workdir import Workdir


def test_train_writes_summary(tiny_run):
    config, workdir = tiny_run
    summary = json.loads((workdir / "train_summary.json").read_text())
    assert summary["step"] == config.training.n_iters
    assert summary["total_wall_time_s"] >= summary["wall_time_s"] > 0
    assert summary["last_steps"] == min(config.training.log_freq, config.training.n_iters)


def test_export_round_trip_matches_checkpoint_ema(tiny_run, tmp_path):
    config, workdir = tiny_run
    result = run_mode("export", config, str(workdir))
    with safe_open(result["path"], framework="pt") as handle:
        metadata = handle.metadata()
    assert int(metadata["step"]) == config.training.n_iters
    assert json.loads(metadata["config"])["model"]["nf"] == config.model.nf
    assert json.loads(metadata["train_summary"])["step"] == config.training.n_iters

    from_checkpoint, _, _ = load_ema_model(config, workdir, torch.device("cpu"))
    from_export, source, step = load_ema_model(config, tmp_path, torch.device("cpu"), result["path"])
    assert step == config.training.n_iters and source == result["path"]
    for (name, a), (_, b) in zip(from_checkpoint.state_dict().items(), from_export.state_dict().items()):
        assert torch.equal(a, b), name


def test_exported_weights_refuse_another_sde(tiny_run, tmp_path):
    config, workdir = tiny_run
    path = run_mode("export", config, str(workdir))["path"]
    other = config.copy_and_resolve_references()
    other.sde.beta_max = 10.0
    with pytest.raises(ValueError, match=r"sde\.beta_max=10\.0 \(weights: 20\.0\)"):
        load_ema_model(other, tmp_path, torch.device("cpu"), path)
    other = config.copy_and_resolve_references()
    other.model.dropout = 0.3  # dropout does not change what the weights compute at eval time
    load_ema_model(other, tmp_path, torch.device("cpu"), path)


def test_export_refuses_safetensors_source(tiny_run):
    config, workdir = tiny_run
    path = run_mode("export", config, str(workdir))["path"]
    other = config.copy_and_resolve_references()
    other.sampling.checkpoint = path
    with pytest.raises(ValueError, match="already exported"):
        run_mode("export", other, str(Workdir(workdir).root))
