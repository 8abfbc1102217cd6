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
    # the workdir is outside the current directory: the source is named from the run directory
    assert metadata["source"] == f"checkpoints/checkpoint_{config.training.n_iters}.pt"

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


def test_exported_sources_name_no_directory_of_the_machine(tmp_path, monkeypatch):
    from sde.modes.export import portable_path

    run_dir = tmp_path / "runs" / "x"
    (run_dir / "checkpoints").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert portable_path(run_dir / "checkpoints" / "c.pt", run_dir) == "runs/x/checkpoints/c.pt"
    monkeypatch.chdir(run_dir / "checkpoints")
    assert portable_path(run_dir / "checkpoints" / "c.pt", run_dir) == "c.pt"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert portable_path(run_dir / "checkpoints" / "c.pt", run_dir) == "checkpoints/c.pt"
    assert portable_path(tmp_path / "other" / "w.pt", run_dir) == "w.pt"


def test_shipped_release_files_name_no_path_of_the_machine():
    """The released weights' metadata and configs hold repository-relative paths only."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    machine_path = re.compile(r'(?:^|[\s"\'=(])(?:/(?:work|tmp|home|root|Users)/|\.\./)')
    texts = {path.name: path.read_text() for path in (root / "release").glob("*.json")}
    for path in (root / "release").glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            texts[path.name] = json.dumps(handle.metadata())
    assert len(texts) >= 6
    offending = {name: machine_path.findall(text) for name, text in texts.items() if machine_path.search(text)}
    assert not offending, offending
    work, shared = "/" + "work/", ".." + "/shared/"  # spelled apart: the repository holds no such path
    assert machine_path.search(f'"source": "{work}runs/release/checkpoints/checkpoint_6000.pt"')
    assert machine_path.search(f"data_dir={shared}data/mnist")
