"""Faults a long training run meets, and bad input: each must end in a defined way.

Checkpoints (sde/checkpoint.py): atomic writes, the last K kept, a truncated / garbage /
unsafe newest file skipped with a warning in favour of the previous one, a pickled
callable refused by ``torch.load(weights_only=True)`` before it can run. The CLI
(main.py): SIGTERM / SIGINT save and exit 0, the same command resumes; SIGKILL at any moment
resumes from the last good checkpoint; every input in ``BAD_INPUTS`` is answered by one
line on stderr and exit code 2 before any training step. bench/fault_injection.py runs
the same faults many times over and shares ``BAD_INPUTS`` (sde/testing/faults.py).
"""
from __future__ import annotations

import ast
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from main import run_mode
from sde import checkpoint
from sde.configuration import USER_ERRORS
from sde.modes.train import train
from sde.testing import BAD_INPUTS, TINY_ARGS, TouchMarker, cli_command, make_tiny_config
from sde.testing.faults import dead_pid
from sde.workdir import TrainingLock

ROOT = Path(__file__).resolve().parents[1]
#: Seconds any one CLI run may take before the test kills it and fails.
CLI_TIMEOUT_S = 180
#: The subprocess environment: one thread per process (2 busy cores) and no traceback escape.
CLI_ENV = {**{k: v for k, v in os.environ.items() if k != "SDE_TRACEBACK"}, "OMP_NUM_THREADS": "1"}
SIGNAL_MESSAGE = re.compile(r"(SIGTERM|SIGINT) received: saved checkpoint of step (\d+); run the same command to resume")
RESUME_MESSAGE = re.compile(r"resumed from \S+checkpoint_(\d+)\.pt \(step (\d+)\)")
SKIP_WARNING = "skipping corrupt checkpoint"


def apply_overrides(config, overrides: list[str]):
    """``--config.a.b=value`` on a ConfigDict in-process (values parsed as Python literals, and
    nan / inf as numbers, as the command line reads a float)."""
    for override in overrides:
        key, _, text = override[len("--config."):].partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = float(text) if text.lower().lstrip("+-") in ("nan", "inf", "infinity") else text
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


# =========================================================================================
# Fast: checkpoints in-process
# =========================================================================================
def small_state(value: float) -> dict:
    """The entries sampling needs of a checkpoint (``checkpoint.WEIGHT_ENTRIES``), small."""
    weights = {"weight": torch.full((3, 3), value)}
    return {"model": weights, "ema": dict(weights), "step": int(value)}


def test_keeps_the_last_k_and_leaves_no_temporary_files(tmp_path):
    for step in range(1, 6):
        checkpoint.save_checkpoint(tmp_path, step, small_state(step), keep=2)
    assert [step for step, _ in checkpoint.list_checkpoints(tmp_path)] == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_4.pt", "checkpoint_5.pt"]


def test_unreadable_newer_files_never_push_good_checkpoints_out(tmp_path):
    """Every checkpoint was damaged, so training restarted from step 0: the damaged files
    (steps 8, 12) must not count among the ``keep`` newest and evict the new good ones."""
    for step in (8, 12):
        checkpoint.checkpoint_path(tmp_path, step).write_bytes(b"damaged")
    assert checkpoint.load_latest(tmp_path) is None
    for step in (2, 4, 6):
        checkpoint.save_checkpoint(tmp_path, step, small_state(step), keep=2)
    assert checkpoint.load_latest(tmp_path)[0] == 6
    assert [step for step, _ in checkpoint.list_checkpoints(tmp_path)] == [4, 6, 8, 12]


def test_a_write_that_fails_midway_leaves_the_previous_file_whole(tmp_path):
    path = tmp_path / "checkpoint_1.pt"
    checkpoint.save_checkpoint(tmp_path, 1, small_state(1), keep=3)
    before = path.read_bytes()

    def crash_after_some_bytes(handle):
        handle.write(b"PK\x03\x04 partial")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        checkpoint.atomic_write(path, crash_after_some_bytes)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_1.pt"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog, damage):
    for step in (1, 2):
        checkpoint.save_checkpoint(tmp_path, step, small_state(step), keep=3)
    newest = tmp_path / "checkpoint_2.pt"
    content = newest.read_bytes()
    newest.write_bytes({"truncated": content[:len(content) // 2], "garbage": os.urandom(len(content)),
                        "empty": b""}[damage])
    with caplog.at_level(logging.WARNING, logger="sde.checkpoint"):
        step, state = checkpoint.load_latest(tmp_path)
    assert step == 1 and torch.equal(state["model"]["weight"], torch.full((3, 3), 1.0))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and SKIP_WARNING in warnings[0] and "checkpoint_2.pt" in warnings[0]


def test_a_checkpoint_carrying_a_pickled_callable_is_refused_and_nothing_runs(tmp_path, caplog):
    checkpoint.save_checkpoint(tmp_path, 1, small_state(1), keep=3)
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "checkpoint_2.pt"
    torch.save({**small_state(2), "extra": TouchMarker(marker)}, evil)

    with pytest.raises(checkpoint.CheckpointError,
                       match=r"cannot load checkpoint \S+checkpoint_2\.pt: refused by torch\.load\(weights_only=True\)"):
        checkpoint.load_checkpoint(evil)
    with caplog.at_level(logging.WARNING, logger="sde.checkpoint"):
        step, _ = checkpoint.load_latest(tmp_path)
    assert step == 1
    assert any(SKIP_WARNING in r.getMessage() for r in caplog.records)
    assert not marker.exists(), "the pickled payload ran"
    # Control: the payload is live -- an unsafe load does run it.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_every_torch_load_in_the_toolkit_is_weights_only():
    calls = []
    for path in [*ROOT.glob("sde/**/*.py"), *ROOT.glob("evaluation/**/*.py"), *ROOT.glob("bench/**/*.py"),
                 ROOT / "main.py"]:
        for match in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", path.read_text()):
            calls.append((path.relative_to(ROOT), match.group(0)))
    assert calls, "found no torch.load at all: the search is broken"
    unsafe = [(str(path), call) for path, call in calls if "weights_only=True" not in call]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"


def test_architecture_mismatch_names_every_kind_of_key():
    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    state = module.state_dict()
    state["0.weight"] = torch.zeros(4, 2)
    del state["1.bias"]
    state["2.weight"] = torch.zeros(1)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"missing: 1\.bias; unexpected: 2\.weight; shape differs: 0\.weight"):
        checkpoint.load_model_weights(module, state, "test file")


# =========================================================================================
# Fast: every bad input in-process (the CLI below checks the exit code and stderr)
# =========================================================================================
@pytest.mark.parametrize("bad", [b for b in BAD_INPUTS if not b.cli_only], ids=lambda b: b.name)
def test_bad_input_is_one_clear_line_before_any_training(tmp_path, bad):
    extra = bad.prepare(tmp_path) if bad.prepare else []
    workdir = next((arg.split("=", 1)[1] for arg in extra if arg.startswith("--workdir=")), str(tmp_path / "run"))
    config = apply_overrides(make_tiny_config(), [*bad.overrides, *(a for a in extra if a.startswith("--config."))])

    def files() -> dict[str, bytes]:
        """The workdir's files but the training lock, which a refused trainer may leave."""
        root = Path(workdir)
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
                if p.is_file() and p.name != TrainingLock.NAME} if root.is_dir() else {}

    prepared = files()
    with pytest.raises(USER_ERRORS) as caught:
        run_mode(bad.mode, config, workdir)
    message = str(caught.value)
    assert "\n" not in message
    assert re.search(bad.match, message), message
    assert files() == prepared, f"work was done: {sorted(set(files()) - set(prepared))} written or changed"


# =========================================================================================
# Slow: the CLI in subprocesses
# =========================================================================================
def cli_cases() -> list:
    """The bad inputs run through main.py here: every one absl refuses (CLI only), every file
    fault (each builds its own files), and the first bad value of each mode. The in-process
    test above checks every entry's message; ``python -m bench.fault_injection`` runs all of
    them through the CLI."""
    cases, modes = [], set()
    for bad in BAD_INPUTS:
        if bad.cli_only or bad.prepare is not None or bad.mode not in modes:
            cases.append(bad)
            modes |= set() if bad.cli_only or bad.prepare is not None else {bad.mode}
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("bad", cli_cases(), ids=lambda b: b.name)
def test_cli_answers_bad_input_with_one_line_and_exit_code_2(tmp_path, bad):
    result = subprocess.run(cli_command(bad, tmp_path), cwd=ROOT, env=CLI_ENV, capture_output=True, text=True,
                            timeout=CLI_TIMEOUT_S)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert re.search(bad.match, lines[0]), lines[0]


class Training:
    """``python main.py --mode train`` on the tiny config in the background, always cleaned up."""

    def __init__(self, workdir: Path, *overrides: str):
        self.workdir = workdir
        self.command = [sys.executable, "main.py", *TINY_ARGS, "--mode=train", f"--workdir={workdir}",
                        "--config.training.sample_freq=1000000", "--config.sampling.steps=1", *overrides]
        self.process: subprocess.Popen | None = None
        self.stdout = self.stderr = ""

    def start(self) -> Training:
        self.log_dir = self.workdir.parent / f"{self.workdir.name}_logs_{time.monotonic_ns()}"
        self.log_dir.mkdir(parents=True)
        with open(self.log_dir / "stdout", "w") as out, open(self.log_dir / "stderr", "w") as err:
            self.process = subprocess.Popen(self.command, cwd=ROOT, env=CLI_ENV, stdout=out, stderr=err)
        return self

    def wait_for_checkpoint(self, newer_than: int = 0, timeout_s: float = CLI_TIMEOUT_S) -> int:
        deadline = time.monotonic() + timeout_s
        while True:
            steps = [step for step, _ in checkpoint.list_checkpoints(self.workdir / "checkpoints")]
            if steps and steps[-1] > newer_than:
                return steps[-1]
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no checkpoint after step {newer_than}:\n{self.read()[1][-3000:]}")
            time.sleep(0.1)

    def finish(self, timeout_s: float = CLI_TIMEOUT_S) -> int:
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"training did not end within {timeout_s} s:\n{self.read()[1][-3000:]}")
        self.stdout, self.stderr = self.read()
        return self.process.returncode

    def read(self) -> tuple[str, str]:
        return (self.log_dir / "stdout").read_text(), (self.log_dir / "stderr").read_text()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def training():
    """Start background training runs; none outlives the test."""
    runs: list[Training] = []

    def start(workdir: Path, *overrides: str) -> Training:
        runs.append(Training(workdir, *overrides).start())
        return runs[-1]

    yield start
    for run in runs:
        run.kill()


@pytest.mark.slow
def test_sigterm_or_sigint_saves_and_exits_0_and_the_same_command_continues(tmp_path, training):
    workdir = tmp_path / "run"
    endless = ("--config.training.n_iters=100000", "--config.training.snapshot_freq=3")
    first = training(workdir, *endless)
    first.wait_for_checkpoint()
    first.process.send_signal(signal.SIGTERM)
    assert first.finish() == 0, first.stderr[-3000:]
    signal_name, stopped_at = SIGNAL_MESSAGE.search(first.stdout).groups()
    stopped_at = int(stopped_at)
    assert signal_name == "SIGTERM"
    assert checkpoint.list_checkpoints(workdir / "checkpoints")[-1][0] == stopped_at

    second = training(workdir, *endless)
    second.wait_for_checkpoint(newer_than=stopped_at)
    second.process.send_signal(signal.SIGINT)  # Ctrl-C
    assert second.finish() == 0, second.stderr[-3000:]
    assert RESUME_MESSAGE.search(second.stdout).groups() == (str(stopped_at), str(stopped_at))
    signal_name, stopped_again_at = SIGNAL_MESSAGE.search(second.stdout).groups()
    assert signal_name == "SIGINT" and int(stopped_again_at) > stopped_at
    assert checkpoint.list_checkpoints(workdir / "checkpoints")[-1][0] == int(stopped_again_at)


@pytest.mark.slow
def test_sigkill_at_a_random_moment_resumes_from_the_last_good_checkpoint(tmp_path, training):
    workdir = tmp_path / "run"
    snapshot_freq, n_iters = 2, 100000
    run = training(workdir, f"--config.training.n_iters={n_iters}", f"--config.training.snapshot_freq={snapshot_freq}")
    run.wait_for_checkpoint()
    time.sleep(random.Random(os.getpid()).uniform(0.0, 2.0))
    run.process.send_signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    last_good, _ = checkpoint.load_latest(workdir / "checkpoints")
    files = checkpoint.list_checkpoints(workdir / "checkpoints")
    assert all(checkpoint.load_checkpoint(path) for _, path in files), "a killed write left a corrupt file"

    target = last_good + snapshot_freq
    # A kill inside a checkpoint write leaves its temporary file behind; make sure there is one.
    (workdir / "checkpoints" / f".checkpoint_{target}.pt.{dead_pid()}.killed.tmp").write_bytes(b"PK\x03\x04 partial")
    rerun = training(workdir, f"--config.training.n_iters={target}", f"--config.training.snapshot_freq={snapshot_freq}")
    assert rerun.finish() == 0, rerun.stderr[-3000:]
    assert RESUME_MESSAGE.search(rerun.stdout).groups() == (str(last_good), str(last_good))
    assert f"trained to step {target}" in rerun.stdout
    complete = {path.name for _, path in checkpoint.list_checkpoints(workdir / "checkpoints")}
    leftovers = [p.name for p in (workdir / "checkpoints").iterdir() if p.name not in complete]
    assert not leftovers, f"temporary files of killed writes left behind: {leftovers}"


@pytest.mark.slow
def test_truncated_newest_checkpoint_resumes_from_the_previous_one_exactly(tmp_path, tiny_run, caplog):
    """tiny_run trained 6 steps (checkpoints 3 and 6). Truncate 6: training resumes at 3 with
    a warning and re-trains steps 4-6 to the same weights, bit for bit."""
    config, reference = tiny_run
    shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
    newest = tmp_path / "checkpoints" / "checkpoint_6.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="sde.checkpoint"):
        summary = train(config, tmp_path)
    assert summary["step"] == 6
    assert any(SKIP_WARNING in r.getMessage() and "checkpoint_6.pt" in r.getMessage() for r in caplog.records)
    expected = checkpoint.load_checkpoint(reference / "checkpoints" / "checkpoint_6.pt")
    actual = checkpoint.load_checkpoint(newest)
    for part in ("model", "ema"):
        for key, value in expected[part].items():
            assert torch.equal(actual[part][key], value), f"{part}.{key} differs after resuming from step 3"
    assert actual["data"] == expected["data"]
