"""Faults a long training run meets, and bad input: each must end in a defined way.

Checkpoints (sde/checkpoint.py): atomic writes, the last K kept, a truncated / garbage /
unsafe newest file skipped with a warning in favour of the previous one, a pickled
callable refused by ``torch.load(weights_only=True)`` before it can run. The CLI
(main.py): SIGTERM / SIGINT save and exit 0, the same command resumes; SIGKILL at any moment
resumes from the last good checkpoint; every input in ``BAD_INPUTS`` is answered by one
line on stderr and exit code 2 before any training step. bench/fault_injection.py runs
the same faults many times over and reuses ``BAD_INPUTS``.
"""
from __future__ import annotations

import ast
import gzip
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import MNIST_DIR, make_tiny_config  # noqa: E402

from sde import checkpoint  # noqa: E402
from main import run_mode  # noqa: E402
from sde.configuration import USER_ERRORS  # noqa: E402
from sde.models import create_model  # noqa: E402
from sde.modes.train import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: Seconds any one CLI run may take before the test kills it and fails.
CLI_TIMEOUT_S = 180
#: The subprocess environment: one thread per process (2 busy cores) and no traceback escape.
CLI_ENV = {**{k: v for k, v in os.environ.items() if k != "SDE_TRACEBACK"}, "OMP_NUM_THREADS": "1"}
#: The tiny config on the embedded MNIST test split, offline (as conftest.make_tiny_config).
TINY_ARGS = ("--config", "configs/tiny.py", f"--config.data.data_dir={MNIST_DIR}",
             "--config.data.split=test", "--config.data.download=False")
SIGNAL_MESSAGE = re.compile(r"(SIGTERM|SIGINT) received: saved checkpoint of step (\d+); run the same command to resume")
RESUME_MESSAGE = re.compile(r"resumed from \S+checkpoint_(\d+)\.pt \(step (\d+)\)")
SKIP_WARNING = "skipping corrupt checkpoint"


# =========================================================================================
# Bad inputs (shared with bench/fault_injection.py)
# =========================================================================================
@dataclass(frozen=True)
class BadInput:
    """One bad input: CLI overrides of the tiny config, and the error line it must produce.

    ``prepare(tmp)`` builds files in ``tmp`` and returns further overrides (and may name
    the workdir with ``--workdir=``); ``cli_only`` inputs fail while absl parses the flags,
    so they have no in-process form.
    """

    name: str
    overrides: tuple[str, ...]
    match: str
    prepare: Callable[[Path], list[str]] | None = None
    cli_only: bool = False
    mode: str = "train"


def _copy_mnist(tmp: Path) -> Path:
    data_dir = tmp / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for source in MNIST_DIR.glob("t10k-*-ubyte.gz"):
        shutil.copy(source, data_dir / source.name)
    return data_dir


def _corrupt_images(change: Callable[[bytes], bytes], compressed: bool = True) -> Callable[[Path], list[str]]:
    """A copy of the MNIST test split whose image file is changed (decompressed or raw)."""
    def prepare(tmp: Path) -> list[str]:
        data_dir = _copy_mnist(tmp)
        images = data_dir / "t10k-images-idx3-ubyte.gz"
        content = images.read_bytes()
        images.write_bytes(gzip.compress(change(gzip.decompress(content)), compresslevel=1) if compressed
                          else change(content))
        return [f"--config.data.data_dir={data_dir}"]
    return prepare


def _damaged_heldout_file(tmp: Path) -> list[str]:
    """A data folder whose train5k images file is there but is not the published one."""
    folder = tmp / "damaged"
    folder.mkdir(exist_ok=True)
    (folder / "train5k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + bytes(12)))
    return [f"--config.data.data_dir={folder}"]


def _workdir_under_a_file(tmp: Path) -> list[str]:
    """A workdir that cannot be created even by root: its parent is a regular file."""
    (tmp / "a_file").write_text("not a directory")
    return [f"--workdir={tmp / 'a_file' / 'run'}"]


def _checkpoint_of_a_wider_model(tmp: Path) -> list[str]:
    wider = make_tiny_config()
    wider.model.nf = 16
    state = create_model(wider).state_dict()
    checkpoint.save_checkpoint(tmp / "run" / "checkpoints", 3, {"model": state, "ema": state}, keep=1)
    return []


def _schedule_file(tmp: Path) -> list[str]:
    """A schedule file of 3 levels, given as the sampler's schedule."""
    (tmp / "schedule3.json").write_text('{"t": [1.0, 0.3, 0.001]}')
    return [f"--config.sampling.options.schedule={tmp / 'schedule3.json'}"]


IDX_LABELS_MAGIC_BYTES = (2049).to_bytes(4, "big")
BAD_INPUTS: tuple[BadInput, ...] = (
    BadInput("unknown sde", ("--config.sde.name=vpp",), r"unknown sde\.name 'vpp'; accepted: vp, subvp, ve"),
    BadInput("unknown sampler", ("--config.sampling.method=euler",),
             r"unknown sampling\.method 'euler'; accepted: ancestral, ddim, .*heun"),
    BadInput("unknown dataset", ("--config.data.dataset=imagenet",),
             r"unknown data\.dataset 'imagenet'; accepted: cifar10, mnist, toy"),
    BadInput("unknown model", ("--config.model.name=resnet",), r"unknown model\.name 'resnet'; accepted: unet, mlp"),
    BadInput("unknown sde schedule", ("--config.sde.schedule=quadratic",),
             r"unknown sde\.schedule 'quadratic'; accepted: linear, cosine"),
    BadInput("batch_size 0", ("--config.training.batch_size=0",),
             r"training\.batch_size must be a positive integer, got 0"),
    BadInput("n_iters -5", ("--config.training.n_iters=-5",), r"training\.n_iters must be a positive integer, got -5"),
    BadInput("snapshot_freq 0", ("--config.training.snapshot_freq=0",),
             r"training\.snapshot_freq must be a positive integer, got 0"),
    BadInput("model.nf 0", ("--config.model.nf=0",), r"model\.nf must be a positive integer, got 0"),
    BadInput("sampling.steps 0", ("--config.sampling.steps=0",), r"sampling\.steps must be a positive integer, got 0"),
    BadInput("sample mode: num_samples 0", ("--config.sampling.num_samples=0",),
             r"sampling\.num_samples must be a positive integer, got 0", mode="sample"),
    BadInput("eta 1.5", ("--config.sampling.options.eta=1.5",), r"sampling\.options: eta must lie in \[0, 1\], got 1\.5"),
    BadInput("eta -0.1", ("--config.sampling.options.eta=-0.1",),
             r"sampling\.options: eta must lie in \[0, 1\], got -0\.1"),
    BadInput("sampling eps 0", ("--config.sampling.options.eps=0.0",),
             r"sampling\.options: eps must lie in \(0, T=1\), got 0\.0"),
    BadInput("training eps 1", ("--config.training.eps=1.0",), r"training\.eps must be in \(0, 1\), got 1\.0"),
    BadInput("image_size 32", ("--config.data.image_size=32",),
             r"mnist images are 28x28 with 1 channel\(s\), but the config has image_size=32, num_channels=1"),
    BadInput("num_channels 3", ("--config.data.num_channels=3",),
             r"mnist images are 28x28 with 1 channel\(s\), but the config has image_size=28, num_channels=3"),
    BadInput("option the sampler does not take", ("--config.sampling.options.snr=0.2",),
             r"sampling\.options: unknown option\(s\) snr for sampler 'ddim'; accepted: "),
    BadInput("unknown sampling option key", ("--config.sampling.options.bogus=1",),
             r"--config\.sampling\.options\.bogus: unknown config key 'bogus' in config\.sampling\.options; "
             r"accepted: atol, .*variance", cli_only=True),
    BadInput("unknown training key", ("--config.training.bogus=1",),
             r"--config\.training\.bogus: unknown config key 'bogus' in config\.training; accepted: amp, ",
             cli_only=True),
    BadInput("unparsable value", ("--config.training.n_iters=ten",),
             r"bad command line: flag --config\.training\.n_iters=ten: ", cli_only=True),
    BadInput("unknown mode", ("--mode=fit",), r"bad command line: flag --mode=fit: value should be one of",
             cli_only=True),
    BadInput("architecture differs from the checkpoint", (),
             r"checkpoint of step 3 does not match the configured model architecture \(shape differs: "
             r"\S+, .*\); check config\.model", prepare=_checkpoint_of_a_wider_model),
    BadInput("dataset file with a bad magic number", (),
             r"t10k-images-idx3-ubyte\.gz: MD5 \w+ does not match the published 9fb629c4189551a2d022fa330f9573f3",
             prepare=_corrupt_images(lambda raw: IDX_LABELS_MAGIC_BYTES + raw[4:])),
    BadInput("dataset file of the wrong size", (), r"t10k-images-idx3-ubyte\.gz: MD5 \w+ does not match the published",
             prepare=_corrupt_images(lambda raw: raw + bytes(28 * 28))),
    BadInput("dataset file truncated", (), r"t10k-images-idx3-ubyte\.gz: MD5 \w+ does not match the published",
             prepare=_corrupt_images(lambda gz: gz[:len(gz) // 2], compressed=False)),
    BadInput("dataset file with one flipped bit", (),
             r"t10k-images-idx3-ubyte\.gz: MD5 \w+ does not match the published",
             prepare=_corrupt_images(lambda raw: raw[:5000] + bytes([raw[5000] ^ 1]) + raw[5001:])),
    BadInput("damaged data file", ("--config.data.split=train5k",),
             r"train5k-images-idx3-ubyte\.gz: MD5 \w+ does not match the published 6057ca5a",
             prepare=_damaged_heldout_file),
    BadInput("unwritable workdir", (), r"workdir \S+/a_file/run cannot be created: Not a directory",
             prepare=_workdir_under_a_file),
    BadInput("sample: missing schedule file", ("--config.sampling.options.schedule=missing.json",),
             r"sampling\.options: schedule file missing\.json does not exist", mode="sample"),
    BadInput("sample: schedule file of another step count",
             ("--config.sampling.steps=5",),
             r"sampling\.options: the explicit schedule has 3 times, so it needs steps=3, got steps=5",
             mode="sample", prepare=_schedule_file),
    BadInput("align_steps: too few steps", ("--config.sampling.steps=2",),
             r"align_steps needs sampling\.steps >= 3 \(the ends stay fixed\), got 2", mode="align_steps"),
    BadInput("eval: unknown dequantization", ("--config.eval.bpd_dequantization=gaussian",),
             r"unknown eval\.bpd_dequantization 'gaussian'; accepted: uniform, truncated_normal", mode="eval"),
    BadInput("eval: truncation past T", ("--config.eval.bpd_dequantization=truncated_normal",
                                         "--config.eval.bpd_truncation=1e-9"),
             r"eval\.bpd_truncation: truncation tau=1e-09 puts t0 outside \(0, T\)", mode="eval"),
    BadInput("train: missing init weights", ("--config.training.init_weights=missing.safetensors",),
             r"training\.init_weights='missing\.safetensors' does not exist"),
)


def cli_command(bad: BadInput, tmp: Path) -> list[str]:
    """The main.py command line of ``bad`` (its files built in ``tmp``)."""
    extra = bad.prepare(tmp) if bad.prepare else []
    workdir = [arg for arg in extra if arg.startswith("--workdir=")] or [f"--workdir={tmp / 'run'}"]
    return [sys.executable, "main.py", *TINY_ARGS, f"--mode={bad.mode}", *workdir, *bad.overrides,
            *(arg for arg in extra if not arg.startswith("--workdir="))]


def apply_overrides(config, overrides: list[str]):
    """``--config.a.b=value`` on a ConfigDict in-process (values parsed as Python literals)."""
    for override in overrides:
        key, _, text = override[len("--config."):].partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
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
    return {"model": {"weight": torch.full((3, 3), value)}, "step": int(value)}


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


class TouchMarker:
    """Unpickling this runs ``os.system("touch <marker>")``: the classic pickle payload."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


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
    for path in [*ROOT.glob("sde/**/*.py"), *ROOT.glob("evaluation/**/*.py"), *ROOT.glob("bench/*.py"),
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
    with pytest.raises(USER_ERRORS) as caught:
        run_mode(bad.mode, config, workdir)
    message = str(caught.value)
    assert "\n" not in message
    assert re.search(bad.match, message), message
    written = [p for p in Path(workdir).rglob("*") if p.is_file()] if Path(workdir).is_dir() else []
    assert [p.name for p in written] in ([], ["checkpoint_3.pt"]), f"work was done: {written}"


# =========================================================================================
# Slow: the CLI in subprocesses
# =========================================================================================
@pytest.mark.slow
@pytest.mark.parametrize("bad", BAD_INPUTS, ids=lambda b: b.name)
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

    def start(self) -> "Training":
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
    (workdir / "checkpoints" / f".checkpoint_{target}.pt.killed.tmp").write_bytes(b"PK\x03\x04 partial")
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
