"""Damaged-but-loadable files, two writers on one workdir, divergence beyond NaN, resuming
under another config, and operating-system errors (docs: README "Reliability").

Each class of fault has tests here that failed before the toolkit handled it; the fault
suite (``python -m bench.fault_injection``) runs the same faults many times over.
"""
from __future__ import annotations

import errno
import json
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

from main import os_error_message
from sde import checkpoint
from sde.divergence import DivergenceGuard, TrainingDiverged, weight_norm
from sde.models import create_model
from sde.modes.train import train
from sde.testing import MNIST_DIR, TINY_ARGS, make_tiny_config
from sde.testing.faults import dead_pid, fault_environment, flip_bit, identical
from sde.workdir import TrainingLock, WorkdirError

ROOT = Path(__file__).resolve().parents[1]
SKIP_WARNING = "skipping corrupt checkpoint"


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SDE_TRACEBACK", None)
    return subprocess.run([sys.executable, "main.py", *TINY_ARGS, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    """The one ``error:`` line of a run that failed with exit ``code``: the only stderr line,
    or, for a fault met while training, the last one, after the progress bar."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if "error: " in line]
    assert result.returncode == code and len(errors) == 1 and lines[-1].startswith("error: "), result.stderr[-2000:]
    assert len(lines) == 1 or "train:" in result.stderr, result.stderr[-2000:]
    return lines[-1]


def export_tiny(config, path: Path, model: torch.nn.Module | None = None) -> Path:
    model = model or create_model(config)
    checkpoint.export_safetensors(model, path, {"step": "6", "config": json.dumps(config.to_dict(), default=list)})
    return path


# =========================================================================================
# 1. Silent corruption: digests
# =========================================================================================
def test_digest_sees_every_kind_of_change():
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 3,
             "rng": {"s": torch.zeros(4, dtype=torch.uint8)}}
    digest = checkpoint.content_digest(state)
    assert digest == checkpoint.content_digest({**state})  # deterministic, key order free
    changed = [
        {**state, "step": 4},
        {**state, "model": {"w": torch.arange(6.0).reshape(3, 2)}},           # shape
        {**state, "model": {"w": torch.arange(6.0, dtype=torch.float64).reshape(2, 3)}},  # dtype
        {**state, "model": {"v": torch.arange(6.0).reshape(2, 3)}},           # key
        {**state, "rng": {"s": torch.tensor([0, 0, 0, 1], dtype=torch.uint8)}},  # one byte
        {**state, "step": 3.0},                                               # type
    ]
    assert all(checkpoint.content_digest(other) != digest for other in changed)


def test_forty_bit_flips_in_a_checkpoint_never_load_silently(tiny_run, tmp_path):
    """Each flip either makes the file refused (skipped) or leaves its content unchanged."""
    _, workdir = tiny_run
    source = workdir / "checkpoints" / "checkpoint_6.pt"
    original = checkpoint.load_checkpoint(source, required=checkpoint.TRAINING_ENTRIES)
    content = source.read_bytes()
    rng = random.Random(0)
    refused = unchanged = silent = 0
    for flip in range(40):
        damaged = tmp_path / f"flip_{flip}.pt"
        damaged.write_bytes(flip_bit(content, rng.randrange(len(content) * 8)))
        try:
            state = checkpoint.load_checkpoint(damaged, required=checkpoint.TRAINING_ENTRIES)
        except checkpoint.CheckpointError:
            refused += 1
            continue
        if identical(state, original):
            unchanged += 1
        else:
            silent += 1
    assert silent == 0 and refused >= 30, (refused, unchanged, silent)


def test_forty_bit_flips_in_exported_weights_never_load_silently(tmp_path):
    config = make_tiny_config()
    path = export_tiny(config, tmp_path / "weights.safetensors")
    reference = create_model(config)
    checkpoint.import_safetensors(reference, path)
    content = path.read_bytes()
    rng = random.Random(1)
    silent = refused = 0
    for flip in range(40):
        damaged = tmp_path / f"flip_{flip}.safetensors"
        damaged.write_bytes(flip_bit(content, rng.randrange(len(content) * 8)))
        model = create_model(config)
        try:
            checkpoint.import_safetensors(model, damaged)
        except checkpoint.CheckpointError:
            refused += 1
            continue
        silent += not identical(model.state_dict(), reference.state_dict())
    assert silent == 0 and refused >= 35, (refused, silent)


def test_a_checkpoint_with_a_changed_tensor_is_skipped_with_a_warning(tmp_path, caplog):
    for step in (1, 2):
        checkpoint.save_checkpoint(tmp_path, step, {"ema": {"w": torch.full((64,), float(step))}, "step": step}, keep=3)
    newest = tmp_path / "checkpoint_2.pt"
    content = newest.read_bytes()
    at = content.rindex(b"\x00\x00\x00\x40")  # the last float32 2.0 of the tensor
    newest.write_bytes(content[:at] + b"\x00\x00\x80\x40" + content[at + 4:])  # 2.0 -> 4.0
    with caplog.at_level(logging.WARNING, logger="sde.checkpoint"):
        step, _ = checkpoint.load_latest(tmp_path)
    assert step == 1
    assert any(SKIP_WARNING in r.getMessage() and "does not match the SHA-256 digest" in r.getMessage()
               for r in caplog.records)


def test_files_written_before_digests_still_load_with_a_note(tmp_path, caplog):
    state = {"ema": {"w": torch.ones(3)}, "step": 5}
    torch.save(state, tmp_path / "checkpoint_5.pt")  # as the toolkit wrote it before digests
    config = make_tiny_config()
    model = create_model(config)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "old.safetensors"),
              metadata={"step": "1"})
    with caplog.at_level(logging.INFO, logger="sde.checkpoint"):
        assert checkpoint.load_latest(tmp_path)[0] == 5
        checkpoint.import_safetensors(create_model(config), tmp_path / "old.safetensors")
    notes = [r.getMessage() for r in caplog.records]
    assert any("carries no digest" in n for n in notes) and any("carry no digest" in n for n in notes)


def test_the_shipped_weights_carry_a_digest_that_holds():
    for name in ("mnist_vp_release.safetensors", "mnist_vp_release_lw.safetensors"):
        metadata = checkpoint.read_safetensors_metadata(ROOT / "release" / name)
        assert metadata[checkpoint.DIGEST_KEY].startswith("sha256:")
        from safetensors.torch import load_file
        checkpoint.verify_weights(load_file(str(ROOT / "release" / name)), metadata, Path(name))


def test_damaged_weights_are_refused_with_one_line_and_exit_2(tiny_run, tmp_path):
    config, workdir = tiny_run
    model = create_model(config)
    model.load_state_dict(checkpoint.load_checkpoint(workdir / "checkpoints" / "checkpoint_6.pt")["ema"])
    path = export_tiny(config, tmp_path / "weights.safetensors", model)
    content = bytearray(path.read_bytes())
    content[-5] ^= 0x10  # inside the last tensor's bytes
    path.write_bytes(bytes(content))
    line = one_error_line(cli("--mode=sample", f"--workdir={tmp_path / 'run'}",
                              f"--config.sampling.checkpoint={path}", "--config.sampling.num_samples=4"))
    assert re.search(r"weights \S+weights\.safetensors are damaged: their content does not match", line), line
    assert not (tmp_path / "run" / "samples").exists()


# =========================================================================================
# 2. Loadable files with the wrong content
# =========================================================================================
@pytest.mark.parametrize("content, reason", [
    (lambda state: torch.zeros(3), r"holds a Tensor, not a checkpoint"),
    (lambda state: {"weights": state["ema"]}, r"lacks 'ema', 'step'"),
    (lambda state: {k: v for k, v in state.items() if k != "ema"}, r"lacks 'ema'"),
    (lambda state: {**state, "ema": torch.zeros(2)}, r"'ema' entry is a Tensor, not a dict"),
    (lambda state: {**state, "ema": {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                                     for k, v in state["ema"].items()}}, r"holds \d+ non-finite values"),
])
def test_loadable_files_with_the_wrong_content_are_skipped_or_refused(tiny_run, tmp_path, caplog, content, reason):
    """As the newest checkpoint of a run: skipped with a warning; as sampling.checkpoint or
    training.init_weights: one line naming the file and exit 2."""
    _, workdir = tiny_run
    good = checkpoint.load_checkpoint(workdir / "checkpoints" / "checkpoint_6.pt", required=checkpoint.TRAINING_ENTRIES)
    shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
    bad_path = tmp_path / "checkpoints" / "checkpoint_9.pt"
    torch.save(content(good), bad_path)
    with caplog.at_level(logging.WARNING, logger="sde.checkpoint"):
        assert checkpoint.load_latest(tmp_path / "checkpoints")[0] == 6
    assert any(SKIP_WARNING in r.getMessage() and re.search(reason, r.getMessage()) for r in caplog.records)
    with pytest.raises(checkpoint.CheckpointError, match=reason):
        checkpoint.load_checkpoint(bad_path)


def test_nan_weights_are_refused_for_sampling_and_fine_tuning(tmp_path):
    config = make_tiny_config()
    model = create_model(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    path = export_tiny(config, tmp_path / "nan.safetensors", model)
    for args in (("--mode=sample", f"--config.sampling.checkpoint={path}"),
                 ("--mode=train", f"--config.training.init_weights={path}")):
        line = one_error_line(cli(*args, f"--workdir={tmp_path / 'run'}"))
        assert re.search(r"weights \S+nan\.safetensors: \S+ holds \d+ non-finite values", line), line
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


# =========================================================================================
# 3. Two writers on one workdir
# =========================================================================================
def test_a_second_trainer_is_refused_naming_the_holder(tmp_path):
    holder = TrainingLock(tmp_path)
    holder.acquire()
    try:
        with pytest.raises(WorkdirError, match=rf"is being trained by process {os.getpid()} on \S+, started "):
            train(make_tiny_config(n_iters=2), tmp_path)
        assert not (tmp_path / "checkpoints").exists()
    finally:
        holder.release()
    TrainingLock(tmp_path).acquire()  # released: the next trainer gets it


def test_a_killed_trainer_leaves_no_stale_lock(tmp_path):
    code = ("import sys, time; from sde.workdir import TrainingLock; lock = TrainingLock(sys.argv[1]); "
            "lock.acquire(); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirError, match=rf"process {holder.pid} "):
        TrainingLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = TrainingLock(tmp_path)
    lock.acquire()
    lock.release()


def test_temporary_files_of_live_writers_are_left_alone(tmp_path):
    mine = tmp_path / f".checkpoint_4.pt.{os.getpid()}.abc.tmp"
    gone = tmp_path / f".checkpoint_4.pt.{dead_pid()}.abc.tmp"
    for path in (mine, gone):
        path.write_bytes(b"partial")
    assert checkpoint.remove_orphans(tmp_path) == [gone]
    assert mine.exists() and not gone.exists()


@pytest.mark.slow
def test_two_trainers_on_one_workdir_the_second_refused_the_first_unharmed(tmp_path):
    """...and a sampler beside them runs: watching a run is allowed."""
    workdir = tmp_path / "run"
    common = ("--mode=train", f"--workdir={workdir}", "--config.training.n_iters=80",
              "--config.training.snapshot_freq=5", "--config.sampling.steps=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_MININTERVAL": "0"}
    first = subprocess.Popen([sys.executable, "main.py", *TINY_ARGS, *common], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (workdir / "checkpoints" / "checkpoint_5.pt").exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first trainer did not start"
        time.sleep(0.05)
    second = cli(*common)
    line = one_error_line(second)
    assert re.search(rf"is being trained by process {first.pid} on \S+, started", line), line
    watching = cli("--mode=sample", f"--workdir={workdir}", "--config.sampling.num_samples=8",
                   "--config.sampling.steps=2")  # sampling beside a trainer is allowed
    assert watching.returncode == 0 and (workdir / "samples").is_dir(), watching.stderr[-2000:]
    assert first.poll() is None, "the first trainer ended before the others ran beside it"
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0 and "trained to step 80" in out, err[-2000:]
    assert "resumed from" not in out
    assert [step for step, _ in checkpoint.list_checkpoints(workdir / "checkpoints")][-1] == 80
    assert not [p for p in (workdir / "checkpoints").iterdir() if p.suffix == ".tmp"]


# =========================================================================================
# 4. "Last good checkpoint" must be good
# =========================================================================================
def test_the_guard_fires_on_loss_or_weight_blow_up_and_not_on_spikes():
    model = torch.nn.Linear(4, 4)
    guard = DivergenceGuard(10.0, window=20)
    guard.start(model)
    rng = random.Random(0)
    for step in range(200):  # a falling loss with heavy single-batch spikes (likelihood weighting)
        guard.observe((1.0 / (1 + step / 20)) * (30.0 if rng.random() < 0.1 else rng.uniform(0.5, 1.5)))
        assert guard.check(model) is None
    for _ in range(20):
        guard.observe(guard.best_median * 12)
    assert "median loss" in guard.check(model)

    guard = DivergenceGuard(10.0, window=20)
    guard.start(model)
    with torch.no_grad():
        model.weight.mul_(1e3)
    assert "weight norm" in guard.check(model)
    assert DivergenceGuard(0.0).check(model) is None  # off


def test_the_guard_carries_its_history_across_resumes():
    model = torch.nn.Linear(4, 4)
    guard = DivergenceGuard(10.0, window=5)
    guard.start(model)
    for value in (1.0, 0.5, 0.4, 0.3, 0.2, 0.1):
        guard.observe(value)
    resumed = DivergenceGuard(10.0, window=5)
    resumed.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    resumed.start(torch.nn.Linear(4, 4))  # a resumed run keeps the first run's reference norm
    assert resumed.state_dict() == guard.state_dict()


def test_a_diverging_run_never_evicts_its_last_good_checkpoint(tmp_path):
    """lr 1e3 after a good run: the weights explode (the loss may stay finite); training stops,
    saves nothing, and every checkpoint of the good run is untouched; a rerun at a sane lr
    resumes from the good state."""
    good = make_tiny_config(n_iters=6, snapshot_freq=3, keep_checkpoints=2)
    train(good, tmp_path)
    before = {path.name: path.read_bytes() for _, path in checkpoint.list_checkpoints(tmp_path / "checkpoints")}
    exploding = make_tiny_config(n_iters=12, snapshot_freq=1, keep_checkpoints=2, lr=30.0)
    with pytest.raises(TrainingDiverged, match=r"This state was not saved; the newest checkpoint, \S+checkpoint_6\.pt "
                                               r"\(step 6\), is from before and untouched\. Lower training\.lr"):
        train(exploding, tmp_path)
    after = {path.name: path.read_bytes() for _, path in checkpoint.list_checkpoints(tmp_path / "checkpoints")}
    assert after == before
    summary = train(make_tiny_config(n_iters=9, snapshot_freq=3, keep_checkpoints=2), tmp_path)
    assert summary["step"] == 9 and summary["bad_steps"] == 0


def test_the_weight_blow_up_is_caught_while_the_loss_is_finite(tmp_path):
    config = make_tiny_config(n_iters=4, snapshot_freq=2, lr=30.0)
    with pytest.raises(TrainingDiverged, match=r"the weight norm, \S+, is [\d.]+x its value when this run began"):
        train(config, tmp_path)
    assert not checkpoint.list_checkpoints(tmp_path / "checkpoints")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist_vp_release", "mnist_vp_release_lw"])
def test_legitimate_runs_stay_far_from_the_divergence_line(name, tmp_path, monkeypatch):
    """The release config from its start and the likelihood-weighted fine-tune (another loss
    scale, heavy-tailed batches) on a shortened budget whose warm-up ends halfway, so that
    the full learning rate is reached: no stop, and both signals stay under a third of the
    factor at every check (the loss median's from step 50, when its window is full)."""
    import importlib

    config = importlib.import_module(f"configs.{name}").get_config()
    config.data.data_dir, config.data.split, config.data.download = str(MNIST_DIR), "test", False
    config.training.batch_size, config.training.n_iters, config.training.snapshot_freq = 8, 70, 10
    config.training.warmup = 35
    config.training.sample_freq = 10**6
    config.sampling.method, config.sampling.steps = "ddim", 1  # the grid written at the last step
    config.training.amp = "none"  # bf16 autocast is far slower on CPUs without AVX512-BF16 / AMX
    config.training.init_weights = config.training.init_weights and str(ROOT / config.training.init_weights)
    ratios, medians = [], []
    real_check = DivergenceGuard.check

    def recording_check(self, module):
        median = self.median()
        medians.append(median)
        ratios.append((median / self.best_median if median and self.best_median else 1.0,
                       weight_norm(module) / self.reference_norm))
        return real_check(self, module)

    monkeypatch.setattr(DivergenceGuard, "check", recording_check)
    summary = train(config, tmp_path)
    assert summary["step"] == 70 and len(ratios) == 7 and sum(m is not None for m in medians) == 3
    assert max(max(pair) for pair in ratios) < config.training.divergence_factor / 3, ratios


# =========================================================================================
# 5. Resume under a different config
# =========================================================================================
def test_resuming_under_another_sde_model_or_data_is_refused_naming_the_keys(tiny_run, tmp_path):
    _, workdir = tiny_run
    shutil.copytree(workdir, tmp_path / "run")
    config_json = (tmp_path / "run" / "config.json").read_bytes()
    result = cli("--mode=train", f"--workdir={tmp_path / 'run'}", "--config.sde.name=subvp",
                 "--config.data.classes=(3,)", "--config.training.n_iters=9")
    line = one_error_line(result)
    assert re.search(r"holds a run trained with another config: sde\.name='subvp' \(the run: 'vp'\); "
                     r"data\.classes=\[3\] \(the run: \[\]\)\. .*--config\.training\.init_weights=", line), line
    assert (tmp_path / "run" / "config.json").read_bytes() == config_json
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")] == [3, 6]


def test_resuming_with_moved_paths_and_a_new_learning_rate_is_allowed(tiny_run, tmp_path):
    config, workdir = tiny_run
    shutil.copytree(workdir, tmp_path / "run")
    moved = make_tiny_config(n_iters=9, lr=config.training.lr / 2)
    shutil.copytree(config.data.data_dir, tmp_path / "data")
    moved.data.data_dir = str(tmp_path / "data")
    assert train(moved, tmp_path / "run")["step"] == 9


# =========================================================================================
# 6. Operating-system errors: one line naming the path, exit 2, nothing lost
# =========================================================================================
def test_an_unreadable_data_file_is_one_line_naming_it(tmp_path, monkeypatch):
    """A data file that exists but cannot be read (permissions, an I/O error): the OSError
    reaches main.py with the file's path, which prints it as one line; nothing was trained."""
    data_dir = tmp_path / "data"
    shutil.copytree(MNIST_DIR, data_dir)
    unreadable = data_dir / "t10k-images-idx3-ubyte.gz"
    real_read_bytes = Path.read_bytes

    def read_bytes(path):
        if path == unreadable:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    config = make_tiny_config()
    config.data.data_dir = str(data_dir)
    with pytest.raises(OSError) as caught:
        train(config, tmp_path / "run")
    assert os_error_message(caught.value) == f"{unreadable}: Permission denied"
    assert not checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")


def run_with_faults(tmp_path: Path, *args: str, **faults: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py", *TINY_ARGS, *args], cwd=ROOT, capture_output=True, text=True,
                          env=fault_environment(tmp_path, **faults), timeout=300)


def test_main_answers_an_os_error_with_one_line_and_exit_2(tmp_path):
    """main.py's handler, through the CLI: the read of a data file fails with EIO."""
    result = run_with_faults(tmp_path, "--mode=train", f"--workdir={tmp_path / 'run'}",
                             FAULT_READ="t10k-labels-idx1-ubyte.gz")
    line = one_error_line(result)
    assert re.fullmatch(r"error: \S+t10k-labels-idx1-ubyte\.gz: Input/output error", line), line


def test_a_disk_that_fills_up_during_training_costs_nothing_saved(tmp_path):
    """ENOSPC while the second checkpoint is written: one line naming it, exit 2; the first
    checkpoint whole, no temporary file left, and the same command resumes from it."""
    workdir = tmp_path / "run"
    args = ("--mode=train", f"--workdir={workdir}", "--config.training.n_iters=6", "--config.training.snapshot_freq=3")
    line = one_error_line(run_with_faults(tmp_path, *args, FAULT_FSYNC="checkpoint_:2"))
    assert re.fullmatch(r"error: \S+checkpoint_6\.pt: No space left on device; nothing was written, the "
                        r"file's previous version \(if any\) is kept", line), line
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["checkpoint_3.pt"]
    rerun = cli(*args)
    assert rerun.returncode == 0 and "resumed from" in rerun.stdout and "(step 3)" in rerun.stdout


def test_checkpoints_that_cannot_be_written_are_named_before_training(tmp_path, monkeypatch):
    real_mkstemp = checkpoint.tempfile.mkstemp

    def refuse_in_checkpoints(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).name == "checkpoints":
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", refuse_in_checkpoints)
    started = []
    monkeypatch.setattr("sde.modes.train._train", lambda *a: started.append(1))
    with pytest.raises(WorkdirError, match=r"cannot write checkpoints in \S+checkpoints: Permission denied"):
        train(make_tiny_config(), tmp_path)
    assert not started


def test_a_full_disk_at_a_save_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    config = make_tiny_config(n_iters=6, snapshot_freq=3)
    real_save = torch.save
    saves = []

    def full_disk_on_second_checkpoint(obj, handle, *args, **kwargs):
        if isinstance(obj, dict) and "optimizer" in obj:
            saves.append(obj["step"])
            if len(saves) == 2:
                handle.write(b"PK\x03\x04 partial")
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk_on_second_checkpoint)
    with pytest.raises(OSError) as caught:
        train(config, tmp_path)
    message = os_error_message(caught.value)
    assert re.search(r"\S+checkpoint_6\.pt: No space left on device; nothing was written", message), message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint_3.pt"]
    checkpoint.load_checkpoint(tmp_path / "checkpoints" / "checkpoint_3.pt", required=checkpoint.TRAINING_ENTRIES)


@pytest.mark.slow
def test_an_interrupted_sample_leaves_no_temporary_files(tiny_run, tmp_path):
    _, workdir = tiny_run
    shutil.copytree(workdir, tmp_path / "run")
    samples = tmp_path / "run" / "samples"
    orphan = samples / f".samples.npz.{dead_pid()}.x.tmp"  # of an earlier sample run that was killed
    orphan.write_bytes(b"partial")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_MININTERVAL": "0"}
    process = subprocess.Popen([sys.executable, "main.py", *TINY_ARGS, "--mode=sample", f"--workdir={tmp_path / 'run'}",
                                "--config.sampling.num_samples=4000", "--config.sampling.batch_size=500",
                                "--config.sampling.method=ancestral", "--config.sampling.steps=200"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".tmp") for p in samples.iterdir() if p != orphan) and orphan.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-2000:]
        time.sleep(0.05)
    assert not orphan.exists(), "the next run did not remove the killed run's temporary file"
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert not [p.name for p in (tmp_path / "run").rglob("*.tmp")]
