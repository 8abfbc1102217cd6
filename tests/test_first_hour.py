"""What a new user meets first: --help, the start-up lines, progress in a terminal and in a
log file, and the quick configuration."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sde.testing import TINY_ARGS

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    environment.pop("SDE_TRACEBACK", None)
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


def test_help_exits_0_and_points_to_every_key():
    for flag in ("--help", "-h"):
        result = run(flag)
        assert result.returncode == 0, result.stderr
        assert "usage: python main.py --config configs/<name>.py" in result.stdout
        assert "configs/default.py lists every key" in result.stdout.replace("\n", " ")
        assert "mnist_quick.py" in result.stdout and "sampling" in result.stdout


def test_the_start_up_says_which_data_in_one_line_and_touches_no_folder(tmp_path):
    """The MNIST-10k split ships in the package: no download is tried, no data folder is made,
    and one line says what the run trains on and how to use full MNIST."""
    result = run("--config", str(ROOT / "configs" / "tiny.py"), "--mode=train", f"--workdir={tmp_path / 'run'}",
                 "--config.training.n_iters=2", "--config.training.sample_freq=2", "--config.sampling.steps=1",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("data: mnist test split, 10,000 images; full MNIST (60,000 images): --config.data.split=train"
            in result.stdout)
    assert not (tmp_path / "data").exists()
    assert "download" not in result.stderr.lower() and "warning" not in result.stderr.lower()
    assert "fontManager" not in result.stderr


def test_a_log_file_of_a_run_is_readable_and_quiet_keeps_the_summaries(tmp_path, tiny_run):
    """stderr to a file (not a terminal): each bar update is a line of its own, short; with
    config.quiet no bar at all, and the stage's summary line stays."""
    _, workdir = tiny_run
    args = ("--mode=sample", f"--workdir={workdir}", f"--config.sampling.checkpoint={workdir}/checkpoints/"
            "checkpoint_6.pt", "--config.sampling.num_samples=8", "--config.sampling.batch_size=4")
    logged = run(*TINY_ARGS, *args, env={"SDE_PROGRESS_INTERVAL": "0"})
    assert logged.returncode == 0, logged.stderr[-2000:]
    lines = logged.stderr.splitlines()
    bars = [line for line in lines if line.startswith("sampling 8 images (ddim, 4 steps)")]
    assert len(bars) >= 4 and "\r" not in logged.stderr, logged.stderr
    assert max(len(line) for line in lines) <= 120
    assert bars[-1].split("|")[-1].strip().startswith("8/8 ")  # 2 batches x 4 NFE
    quiet = run(*TINY_ARGS, *args, "--config.quiet=True")
    assert quiet.returncode == 0 and "sampling 8 images" not in quiet.stderr
    assert "wrote 8 samples" in quiet.stdout or "8 samples" in quiet.stdout


@pytest.mark.parametrize("name", ["mnist_quick"])
def test_the_quick_config_is_small_and_runs_on_the_embedded_data(name):
    import importlib

    from sde.configuration import validate
    from sde.models import count_parameters, create_model

    config = importlib.import_module(f"configs.{name}").get_config()
    validate(config)
    assert config.data.split in ("test", "train5k") and config.eval.heldout_split in ("test", "train5k")
    assert config.data.split != config.eval.heldout_split
    assert count_parameters(create_model(config)) < 400_000


@pytest.mark.slow
def test_every_long_stage_of_eval_shows_progress_and_a_summary(tmp_path, tiny_run):
    """A small eval with stderr to a pipe: a bar for each long stage in its own unit (held-out
    images, reference images, network evaluations), short lines, and a summary line each."""
    _, workdir = tiny_run
    result = run(*TINY_ARGS, "--mode=eval", f"--workdir={tmp_path / 'run'}",
                 f"--config.sampling.checkpoint={workdir}/checkpoints/checkpoint_6.pt",
                 "--config.eval.num_samples=8", "--config.eval.reference_num_images=16",
                 "--config.eval.bpd_num_images=4", "--config.eval.batch_size=4", "--config.sampling.batch_size=4",
                 env={"SDE_PROGRESS_INTERVAL": "0", "SDE_CACHE_DIR": str(tmp_path / "empty_cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert max(len(line) for line in lines) <= 120 and "\r" not in result.stderr
    for stage, unit in (("held-out bits/dim (ODE, ELBO) of 4 images", r"4/4 \[.*img"),
                        ("reference Inception statistics (test)", r"16/16 \[.*img"),
                        ("sampling 8 images (ddim, 4 steps)", r"8/8 \[.*NFE")):
        bars = [line for line in lines if line.startswith(stage)]
        assert len(bars) >= 2 and re.search(unit, bars[-1]), (stage, bars)
    for summary in ("held-out bits/dim of 4 images: ODE ", "reference statistics: 16 mnist test images, computed in",
                    "samples: 8 in "):
        assert summary in result.stdout, result.stdout
