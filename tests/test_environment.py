"""Every mode says what it runs on: one line at start, and the same facts in its records."""
import json

import torch

from main import run_mode
from sde import environment


def test_the_line_names_device_precision_torch_and_processes():
    described = environment.describe(torch.device("cpu"), processes=2, autocast="bf16")
    assert described["device"] == "cpu" and described["device_name"] == environment.cpu_model()
    assert described["torch"] == torch.__version__ and described["dtype"] == "float32"
    assert environment.line(described).startswith(
        f"device: cpu ({environment.cpu_model()}), float32, bf16 autocast; torch {torch.__version__}; 2 processes")


def test_training_records_its_environment(tiny_run):
    config, workdir = tiny_run
    recorded = json.loads((workdir / "config.json").read_text())["environment"]
    assert recorded["device"] == "cpu" and recorded["processes"] == 1 and recorded["autocast"] == "none"
    summary = json.loads((workdir / "train_summary.json").read_text())
    assert summary["environment"] == recorded
    assert summary["host_syncs_per_step"] == 1  # the finite check the update waits for, nothing else


def test_sampling_prints_and_records_its_environment(tiny_run, capsys):
    config, workdir = tiny_run
    config = config.copy_and_resolve_references()
    config.sampling.num_samples, config.sampling.steps = 2, 2
    record = run_mode("sample", config, str(workdir))
    assert capsys.readouterr().out.startswith(f"device: cpu ({environment.cpu_model()}), float32; torch")
    assert record["environment"]["device"] == "cpu"
    saved = json.loads((workdir / "samples" / "ddim_2steps_seed0.json").read_text())
    assert saved["environment"] == record["environment"]
