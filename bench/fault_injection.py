"""Fault injection: SIGKILL at random moments, damaged files, two writers, divergence, OS errors, bad input.

    python -m bench.fault_injection                   # 20 kills: a few minutes on 2 cores
    python -m bench.fault_injection --kills 2 --bad-inputs 3 --no-write   # a smoke run

Every run is ``python main.py --mode train`` on configs/tiny.py (the MNIST test split,
offline) in a subprocess with one thread, exactly as a user would start it. The parts:

1. SIGKILL. Episodes of a ``N_ITERS``-step run. Each launch is killed at a random moment
   (seeded RNG): most while training (a delay after the model is built, uniform over a
   third of the measured training time), every ``STARTUP_KILL_EVERY``-th during start-up.
   Then the same command runs again. After every kill: each checkpoint file left must
   load; the rerun must resume from the newest one ("resumed from ... (step S)"); a
   checkpoint counts as lost when S is more than ``snapshot_freq`` steps behind the last
   step the killed run reached (from its progress bar). A completed episode's final
   checkpoint (model, EMA, optimizer, data position, RNG) must equal, bit for bit, the
   one of an uninterrupted run: resume is exact.
2. Damaged checkpoints of a finished run: the newest truncated, overwritten with garbage,
   emptied, replaced by a file carrying a pickled callable, with one bit flipped inside a
   tensor, replaced by a bare tensor, by a checkpoint without its EMA or with NaN weights;
   a temporary file of a killed write left over; every checkpoint damaged. The rerun must warn, skip it, resume
   from the previous one (from scratch when none is left), end bit-identical to the
   uninterrupted run, and nothing in the files may run.
3. Damaged dataset files (image / label file truncated, one bit flipped, emptied, garbage):
   exit code 2 and one line on stderr naming the file.
4. Bad input: every entry of ``sde.testing.BAD_INPUTS`` (unknown names, bad
   sizes and ranges, mismatched data shape or checkpoint architecture, corrupt data,
   unwritable workdir, unknown config keys and sampler options): exit code 2 and one
   line on stderr matching the expected message.
5. Random single-bit flips in the newest checkpoint and in weights exported from it, read
   by the toolkit's loaders: none may load with changed content (the SHA-256 digests).
6. A second trainer started on the workdir of a running one, and a sampler beside them:
   the trainer is refused (exit 2, naming the first), the sampler runs, and the first ends
   bit-identical to the uninterrupted run.
7. The finished run resumed at learning rates far too large with a checkpoint every step:
   it stops (exit 1, one line) and every checkpoint stays byte-identical.
8. Operating-system errors injected into the subprocess: a data file that cannot be read,
   checkpoints that cannot be written, a disk that fills up during a checkpoint write,
   SIGTERM during sampling: one line naming the path, nothing lost, no temporary file.

Prints the counts and the table, writes ``bench/results/fault_injection.json``; exits 1 if
any fault was mishandled.
"""
from __future__ import annotations

import argparse
import itertools
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bench.common import REPO as ROOT
from bench.common import add_write_options, format_reading, table, write_result
from sde import checkpoint
from sde.testing import BAD_INPUTS, MNIST_DIR, TINY_ARGS, TouchMarker, cli_command
from sde.testing.faults import dead_pid, fault_environment, flip_bit, identical

NAME, TITLE = "fault_injection", "Fault injection: kills, damaged files, bad input"

N_ITERS, SNAPSHOT_FREQ = 40, 4
#: The run every fault is injected into (a final grid of one sampler step keeps the end cheap).
RUN_OVERRIDES = (f"--config.training.n_iters={N_ITERS}", f"--config.training.snapshot_freq={SNAPSHOT_FREQ}",
                 f"--config.training.log_freq={SNAPSHOT_FREQ}", f"--config.training.sample_freq={N_ITERS}",
                 "--config.sampling.steps=1")
#: One thread per process (bit-identical runs need the same threading); a progress-bar
#: line for every step (tqdm reads TQDM_* overrides) so the last step reached is known.
ENV = {**{k: v for k, v in os.environ.items() if k != "SDE_TRACEBACK"},
       "OMP_NUM_THREADS": "1", "TQDM_MININTERVAL": "0"}
RUN_TIMEOUT_S = 600
STARTUP_KILL_EVERY = 5
RESUMED = re.compile(r"resumed from \S+checkpoint_(\d+)\.pt \(step (\d+)\)")
PROGRESS = re.compile(rf"(\d+)/{N_ITERS} \[")
SKIP_WARNING = "skipping corrupt checkpoint"


#: Every launch, so that an interrupted benchmark kills what it started.
LIVE: list[Launch] = []


class Launch:
    """``main.py --mode train`` in the background; stdout / stderr go to files."""

    def __init__(self, workdir: Path, logs: Path):
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = logs / "stdout", logs / "stderr"
        command = [sys.executable, "main.py", *TINY_ARGS, "--mode=train", f"--workdir={workdir}", *RUN_OVERRIDES]
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=out, stderr=err)
        self.started = time.monotonic()
        LIVE.append(self)

    def wait(self, timeout_s: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_until(self, reached, timeout_s: float = RUN_TIMEOUT_S) -> float:
        """Seconds after launch at which ``reached()`` became true (inf if the run ended first)."""
        deadline = self.started + timeout_s
        while not reached():
            if self.process.poll() is not None:
                return float("inf")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"launch did not get there within {timeout_s} s:\n{self.stderr[-2000:]}")
            time.sleep(0.01)
        return time.monotonic() - self.started

    def last_step(self) -> int:
        return max((int(step) for step in PROGRESS.findall(self.stderr)), default=0)

    def resumed_step(self) -> int | None:
        match = RESUMED.search(self.stdout)
        return int(match.group(2)) if match else None


#: Checkpoint entries that measure the run instead of being its state (the training time
#: carried across resumes): left out when a resumed run is compared with an uninterrupted one.
TIMING_KEYS = ("wall_time_s",)


def final_state(workdir: Path) -> dict:
    """The final checkpoint without `TIMING_KEYS`: what must be bit-identical after resumes."""
    state = checkpoint.load_checkpoint(checkpoint.checkpoint_path(workdir / "checkpoints", N_ITERS))
    return {key: value for key, value in state.items() if key not in TIMING_KEYS}


def newest_loadable(workdir: Path) -> tuple[int | None, int]:
    """(newest step whose file loads, number of checkpoint files that do not load)."""
    good, corrupt = None, 0
    for step, path in checkpoint.list_checkpoints(workdir / "checkpoints"):
        try:
            checkpoint.load_checkpoint(path)
            good = step
        except checkpoint.CheckpointError:
            corrupt += 1
    return good, corrupt


# ---- 1. SIGKILL --------------------------------------------------------------------------
@dataclass
class KillReport:
    kills: int = 0
    kills_in_startup: int = 0
    resumed: int = 0
    checkpoints_lost: int = 0
    corrupt_files: int = 0
    episodes: int = 0
    episodes_exact: int = 0
    largest_setback: int = 0


def kill_campaign(kills: int, rng: random.Random, reference: dict, startup_s: float, step_s: float,
                  work: Path, log) -> KillReport:
    """Kill launches until ``kills`` kills are done, then let the last episode finish."""
    report = KillReport()
    episode_dir = None
    expected_resume: int | None = None  # the newest good checkpoint when the last kill hit
    unchecked_kills = 0                 # kills whose resume no launch has shown yet
    for launch_index in itertools.count(1):
        if episode_dir is None:
            if report.kills >= kills:
                return report
            report.episodes += 1
            episode_dir, expected_resume = work / f"episode_{report.episodes}", None
        run = Launch(episode_dir, work / "logs" / f"kill_{launch_index}")
        # once the final checkpoint exists, the next launch only has to confirm it and exit
        want_kill = report.kills < kills and expected_resume != N_ITERS
        in_startup = want_kill and (report.kills + 1) % STARTUP_KILL_EVERY == 0
        if in_startup:
            time.sleep(rng.uniform(0.0, startup_s))
        elif want_kill:  # a random step of what is left, then a random moment within a step
            target = rng.randint((expected_resume or 0) + 1, N_ITERS)
            if run.wait_until(lambda: run.last_step() >= target) != float("inf"):
                time.sleep(rng.uniform(0.0, step_s))
        killed = want_kill and run.process.poll() is None
        if killed:
            run.kill()
        else:
            run.wait()
        # A launch that got as far as training shows where it resumed: check the kills before it.
        resumed = run.resumed_step()
        if unchecked_kills and PROGRESS.search(run.stderr):
            if resumed == expected_resume:
                report.resumed += unchecked_kills
            else:
                log(f"  launch {launch_index}: resumed from {resumed}, expected {expected_resume}")
            unchecked_kills = 0
        if killed:
            report.kills += 1
            report.kills_in_startup += in_startup
            unchecked_kills += 1
            newest, corrupt = newest_loadable(episode_dir)
            report.corrupt_files += corrupt
            reached = max(run.last_step(), resumed or 0, expected_resume or 0)
            setback = reached - (newest or 0)
            report.largest_setback = max(report.largest_setback, setback)
            lost = setback > SNAPSHOT_FREQ
            report.checkpoints_lost += lost
            log(f"  kill {report.kills:2d} ({'start-up' if in_startup else 'training'}) after "
                f"{time.monotonic() - run.started:4.1f} s: reached step {reached:2d}, newest checkpoint {newest}"
                f"{'  LOST' if lost else ''}")
            expected_resume = newest
            continue
        if run.process.returncode != 0 or f"trained to step {N_ITERS}" not in run.stdout:
            log(f"  launch {launch_index} failed with exit code {run.process.returncode}:\n{run.stderr[-2000:]}")
            return report
        exact = identical(final_state(episode_dir), reference)
        report.episodes_exact += exact
        log(f"  episode {report.episodes} completed: final checkpoint "
            f"{'bit-identical to' if exact else 'DIFFERS from'} the uninterrupted run")
        episode_dir = None
    return report


# ---- 2. damaged checkpoints --------------------------------------------------------------
def checkpoint_damage(reference_dir: Path, reference: dict, work: Path, log) -> tuple[int, int]:
    """Damage the finished reference run's checkpoints; returns (cases, handled)."""
    steps = [step for step, _ in checkpoint.list_checkpoints(reference_dir / "checkpoints")]
    newest_name, previous = f"checkpoint_{steps[-1]}.pt", steps[-2]
    marker = work / "payload_ran"

    def truncate(directory: Path) -> None:
        path = directory / newest_name
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])

    def garbage(directory: Path) -> None:
        path = directory / newest_name
        path.write_bytes(random.Random(0).randbytes(path.stat().st_size))

    def empty(directory: Path) -> None:
        (directory / newest_name).write_bytes(b"")

    def pickled_callable(directory: Path) -> None:
        state = checkpoint.load_checkpoint(directory / newest_name)
        torch.save({**state, "payload": TouchMarker(marker)}, directory / newest_name)

    def killed_write(directory: Path) -> None:
        (directory / f".{newest_name}.{dead_pid()}.killed.tmp").write_bytes(b"PK\x03\x04 partial")
        (directory / newest_name).unlink()

    def flipped_bit(directory: Path) -> None:  # loads without error; only the digest sees it
        path = directory / newest_name
        content = path.read_bytes()
        storage = bytes(max(reference["model"].values(), key=lambda tensor: tensor.numel()).untyped_storage())
        at = content.index(storage)  # a storage's bytes are stored as they are in memory
        path.write_bytes(flip_bit(content, 8 * (at + len(storage) // 2) + 3))

    def rewritten(change) -> Callable[[Path], None]:
        def damage(directory: Path) -> None:
            state = checkpoint.load_checkpoint(directory / newest_name, required=checkpoint.TRAINING_ENTRIES)
            torch.save(change(state), directory / newest_name)
        return damage

    def nan_weights(state: dict) -> dict:
        return {**state, "ema": {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                                 for k, v in state["ema"].items()}}

    def all_damaged(directory: Path) -> None:
        for _, path in checkpoint.list_checkpoints(directory):
            path.write_bytes(path.read_bytes()[:100])

    # (name, damage, step the rerun must resume from, whether it must warn)
    cases = [("newest truncated", truncate, previous, True), ("newest garbage", garbage, previous, True),
             ("newest empty", empty, previous, True),
             ("newest carries a pickled callable", pickled_callable, previous, True),
             ("temporary file of a killed write", killed_write, previous, False),
             ("newest with one bit flipped inside a tensor", flipped_bit, previous, True),
             ("newest a bare tensor", rewritten(lambda state: torch.zeros(3)), previous, True),
             ("newest without its EMA", rewritten(lambda state: {k: v for k, v in state.items() if k != "ema"}),
              previous, True),
             ("newest with NaN weights", rewritten(nan_weights), previous, True),
             ("every checkpoint damaged", all_damaged, None, True)]
    handled = 0
    for index, (name, damage, resume_from, must_warn) in enumerate(cases):
        workdir = work / f"damaged_{index}"
        shutil.copytree(reference_dir / "checkpoints", workdir / "checkpoints")
        damage(workdir / "checkpoints")
        run = Launch(workdir, work / "logs" / f"damaged_{index}")
        code = run.wait()
        leftovers = [p.name for p in (workdir / "checkpoints").iterdir()
                     if p.name not in {q.name for _, q in checkpoint.list_checkpoints(workdir / "checkpoints")}]
        checks = {"exit 0": code == 0, "warned as expected": (SKIP_WARNING in run.stderr) == must_warn,
                  "resumed": run.resumed_step() == resume_from,
                  "exact": code == 0 and identical(final_state(workdir), reference),
                  "payload did not run": not marker.exists(), "no temporary files left": not leftovers}
        ok = all(checks.values())
        handled += ok
        log(f"  {name}: {'ok' if ok else 'FAILED ' + str([k for k, v in checks.items() if not v])}"
            f" (resumed from {run.resumed_step()})")
    return len(cases), handled


# ---- 5. bit flips: loaded with the toolkit's own readers, in-process ---------------------
def bit_flips(reference_dir: Path, flips: int, rng: random.Random, work: Path) -> dict:
    """``flips`` random single-bit flips of the newest checkpoint and of weights exported
    from it: how many were refused, loaded unchanged (a bit the content does not depend
    on) and loaded changed (silently: must be 0)."""
    from sde.inference import load_weights
    from sde.models import create_model
    from sde.testing import make_tiny_config

    newest = checkpoint.list_checkpoints(reference_dir / "checkpoints")[-1][1]
    original = checkpoint.load_checkpoint(newest, required=checkpoint.TRAINING_ENTRIES)
    config = make_tiny_config()
    model = create_model(config)
    model.load_state_dict(original["ema"])
    weights = work / "flips" / "ema.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.export_safetensors(model, weights, {"step": str(N_ITERS)})
    counts = {}
    for kind, path in (("checkpoint", newest), ("weights", weights)):
        content = path.read_bytes()
        refused = unchanged = silent = 0
        for flip in range(flips):
            damaged = work / "flips" / f"{kind}_{flip}{path.suffix}"
            damaged.write_bytes(flip_bit(content, rng.randrange(len(content) * 8)))
            try:
                if kind == "checkpoint":
                    loaded = checkpoint.load_checkpoint(damaged, required=checkpoint.TRAINING_ENTRIES)
                    same = identical(loaded, original)
                else:
                    subject = create_model(config)
                    load_weights(subject, config, damaged)
                    same = identical(subject.state_dict(), model.state_dict())
            except checkpoint.CheckpointError:
                refused += 1
                continue
            unchanged += same
            silent += not same
        counts[kind] = {"flips": flips, "refused": refused, "unchanged": unchanged, "silent": silent}
    return counts


def digest_cost(work: Path, rounds: int = 5) -> dict:
    """Seconds to load a checkpoint of the release's size (configs/mnist_vp.py's U-Net, its
    EMA and Adam state) and the released weights, with the digest verified and without
    (``torch.load`` / safetensors alone), interleaved, medians of ``rounds``."""
    import statistics

    from safetensors.torch import load_file

    from configs import mnist_vp
    from sde.models import create_model

    model = create_model(mnist_vp.get_config())
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.zeros(2, 1, 28, 28), torch.full((2,), 0.5)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "ema": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1}
    directory = work / "digest_cost"
    path = checkpoint.save_checkpoint(directory, 1, state, keep=1)
    weights = ROOT / "release" / "mnist_vp_release.safetensors"

    def fresh() -> torch.nn.Module:
        return create_model(mnist_vp.get_config())

    timings = {name: [] for name in ("checkpoint_verified", "checkpoint_plain", "weights_verified", "weights_plain")}
    for _ in range(rounds):
        for name, load in (("checkpoint_verified", lambda: checkpoint.load_checkpoint(path)),
                           ("checkpoint_plain", lambda: torch.load(path, map_location="cpu", weights_only=True)),
                           ("weights_verified", lambda: checkpoint.import_safetensors(fresh(), weights)),
                           ("weights_plain", lambda: fresh().load_state_dict(load_file(str(weights))))):
            started = time.perf_counter()
            load()
            timings[name].append(time.perf_counter() - started)
    return {"checkpoint_mb": path.stat().st_size / 2**20, "weights_mb": weights.stat().st_size / 2**20,
            **{name: statistics.median(values) for name, values in timings.items()}}


# ---- 6. two trainers on one workdir ------------------------------------------------------
def two_writers(trials: int, reference: dict, work: Path, log) -> tuple[int, int]:
    """A second ``--mode train`` on the workdir of a running one: it must exit 2 naming the
    first, which must finish bit-identical to the uninterrupted run."""
    held = 0
    for trial in range(trials):
        workdir = work / f"writers_{trial}"
        first = Launch(workdir, work / "logs" / f"writers_{trial}_first")
        first.wait_until(lambda: checkpoint.list_checkpoints(workdir / "checkpoints"))
        second = Launch(workdir, work / "logs" / f"writers_{trial}_second")
        # a user watching the run samples from it meanwhile: allowed, and harmless both ways
        sampler = subprocess.run([sys.executable, "main.py", *TINY_ARGS, "--mode=sample", f"--workdir={workdir}",
                                  "--config.sampling.num_samples=8", "--config.sampling.steps=2"],
                                 cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        second_code = second.wait()
        second_line = second.stderr.strip().splitlines()[-1] if second.stderr.strip() else ""
        first_code = first.wait()
        checks = {"second exit 2": second_code == 2,
                  "second names the first": f"is being trained by process {first.process.pid} " in second_line,
                  "sampler beside it exit 0": sampler.returncode == 0,
                  "first exit 0": first_code == 0,
                  "first exact": first_code == 0 and identical(final_state(workdir), reference)}
        ok = all(checks.values())
        held += ok
        log(f"  trial {trial + 1}: {'ok' if ok else 'FAILED ' + str([k for k, v in checks.items() if not v])}")
    return trials, held


# ---- 7. divergence: a diverged state never replaces a good checkpoint ------------------------
DIVERGING_LRS = (10.0, 30.0, 100.0)


def divergence(reference_dir: Path, work: Path, log) -> tuple[int, int]:
    """Resume the finished run with a learning rate far too large and a checkpoint every
    step: it must stop with exit 1 and one line, leave every checkpoint byte-identical, and
    the same command at the original learning rate must then resume from the newest."""
    held = 0
    for index, lr in enumerate(DIVERGING_LRS):
        workdir = work / f"diverging_{index}"
        shutil.copytree(reference_dir, workdir)
        before = {path.name: path.read_bytes() for _, path in checkpoint.list_checkpoints(workdir / "checkpoints")}
        more = (f"--config.training.n_iters={N_ITERS + 20}", "--config.training.snapshot_freq=1")
        diverged = subprocess.run([sys.executable, "main.py", *TINY_ARGS, "--mode=train", f"--workdir={workdir}",
                                   *more, f"--config.training.lr={lr}"], cwd=ROOT, env=ENV, capture_output=True,
                                  text=True, timeout=RUN_TIMEOUT_S)
        after = {path.name: path.read_bytes() for _, path in checkpoint.list_checkpoints(workdir / "checkpoints")}
        last = diverged.stderr.strip().splitlines()[-1] if diverged.stderr.strip() else ""
        checks = {"exit 1": diverged.returncode == 1, "one error line": last.startswith("error: ")
                  and "is from before and untouched" in last, "checkpoints untouched": after == before}
        ok = all(checks.values())
        held += ok
        reason = "non-finite steps" if "non-finite steps" in last else "weight norm" if "weight norm" in last else "?"
        log(f"  lr {lr:g}: {'ok' if ok else 'FAILED ' + str([k for k, v in checks.items() if not v])} ({reason})")
    return len(DIVERGING_LRS), held


# ---- 8. operating-system errors ----------------------------------------------------------
def os_errors(reference_dir: Path, work: Path, log) -> tuple[int, int]:
    """Injected into the subprocess (``sde.testing.faults.fault_environment``): a data file
    that cannot be read; checkpoints that cannot be written; the disk filling up during the
    second checkpoint write; SIGTERM during ``--mode sample``. One line and exit 2 (143 for
    SIGTERM), nothing already written lost, no temporary file left."""
    def command(workdir: Path, *extra: str) -> list[str]:
        return [sys.executable, "main.py", *TINY_ARGS, f"--workdir={workdir}", *extra]

    def one_line(result, pattern: str) -> bool:
        lines = result.stderr.strip().splitlines()
        return (result.returncode == 2 and bool(lines) and re.search(pattern, lines[-1]) is not None
                and sum("error: " in line for line in lines) == 1)

    def no_temporary(workdir: Path) -> bool:
        return not list(workdir.rglob("*.tmp"))

    results = {}
    workdir = work / "os_read"
    result = subprocess.run(command(workdir, "--mode=train"), cwd=ROOT, capture_output=True, text=True,
                            env=fault_environment(work / "os_read_hooks", FAULT_READ="t10k-labels-idx1-ubyte.gz"))
    results["data file unreadable (EIO)"] = one_line(result, r"t10k-labels-idx1-ubyte\.gz: Input/output error")

    workdir = work / "os_unwritable"
    result = subprocess.run(command(workdir, "--mode=train"), cwd=ROOT, capture_output=True, text=True,
                            env=fault_environment(work / "os_unwritable_hooks", FAULT_FSYNC=".write_test:1"))
    results["checkpoints/ not writable"] = (one_line(result, r"cannot write checkpoints in \S+checkpoints")
                                            and not checkpoint.list_checkpoints(workdir / "checkpoints"))

    workdir = work / "os_full"
    full = (f"--config.training.n_iters={N_ITERS}", f"--config.training.snapshot_freq={N_ITERS // 2}")
    result = subprocess.run(command(workdir, "--mode=train", *full), cwd=ROOT, capture_output=True, text=True,
                            env=fault_environment(work / "os_full_hooks", FAULT_FSYNC="checkpoint_:2"))
    kept = [step for step, _ in checkpoint.list_checkpoints(workdir / "checkpoints")]
    rerun = subprocess.run(command(workdir, "--mode=train", *full), cwd=ROOT, env=ENV, capture_output=True, text=True)
    results["disk full during a checkpoint write"] = (
        one_line(result, rf"checkpoint_{N_ITERS}\.pt: No space left on device") and kept == [N_ITERS // 2]
        and no_temporary(workdir) and rerun.returncode == 0 and f"(step {N_ITERS // 2})" in rerun.stdout)

    workdir = work / "os_sample"
    shutil.copytree(reference_dir, workdir)
    sampling = subprocess.Popen(command(workdir, "--mode=sample", "--config.sampling.num_samples=4000",
                                        "--config.sampling.batch_size=500", "--config.sampling.method=ancestral",
                                        "--config.sampling.steps=200"), cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not list((workdir / "samples").glob("*.tmp")) and time.monotonic() < deadline and sampling.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)
    sampling.send_signal(signal.SIGTERM)
    code = sampling.wait(timeout=RUN_TIMEOUT_S)
    results["SIGTERM during --mode sample"] = code == 128 + signal.SIGTERM and no_temporary(workdir)
    for name, ok in results.items():
        log(f"  {'ok    ' if ok else 'FAILED'} {name}")
    return len(results), sum(results.values())


# ---- 3 and 4. damaged data and bad input: exit code 2, one line ---------------------------
def one_line_exit_2(command: list[str], expected: str) -> tuple[bool, str]:
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    lines = result.stderr.strip().splitlines()
    ok = (result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
          and re.search(expected, lines[0]) is not None)
    return ok, lines[0] if len(lines) == 1 else f"exit {result.returncode}, {len(lines)} stderr lines"


def data_damage_commands(work: Path) -> list[tuple[str, list[str], str]]:
    damages = {"truncated": lambda b: b[:len(b) // 2], "one bit flipped": lambda b: b[:999] + bytes([b[999] ^ 1]) + b[1000:],
               "emptied": lambda b: b"", "garbage": lambda b: random.Random(1).randbytes(len(b))}
    commands = []
    for kind in ("images", "labels"):
        name = f"t10k-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz"
        for label, damage in damages.items():
            data_dir = work / "data" / f"{kind}_{label.replace(' ', '_')}"
            shutil.copytree(MNIST_DIR, data_dir)
            (data_dir / name).write_bytes(damage((data_dir / name).read_bytes()))
            command = [sys.executable, "main.py", *TINY_ARGS, "--mode=train", f"--workdir={work / 'data_run'}",
                       f"--config.data.data_dir={data_dir}"]
            commands.append((f"{kind} file {label}", command, rf"{re.escape(name)}: MD5 \w+ does not match"))
    return commands


def answer_all(cases: list[tuple[str, list[str], str]], jobs: int, log) -> int:
    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda case: one_line_exit_2(case[1], case[2]), cases))
    for (name, _, _), (ok, line) in zip(cases, results):
        log(f"  {'ok    ' if ok else 'FAILED'} {name}: {line}")
    return sum(ok for ok, _ in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to inject")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--jobs", type=int, default=2, help="bad-input runs at a time")
    parser.add_argument("--flips", type=int, default=40, help="random bit flips per file kind")
    parser.add_argument("--writer-trials", type=int, default=3, help="second-trainer trials")
    parser.add_argument("--bad-inputs", type=int, default=0,
                        help="only the first N entries of BAD_INPUTS (0: all, the protocol)")
    add_write_options(parser)
    args = parser.parse_args()
    if min(args.kills, args.bad_inputs, args.flips, args.writer_trials) < 0:
        parser.error("--kills, --bad-inputs, --flips and --writer-trials must be >= 0")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        result = run_all(args)
    finally:
        for launch in LIVE:
            launch.kill()
    if result is None:
        return 1
    write_result(args, NAME, TITLE, result, render)
    return 0 if result["all_handled"] else 1


def run_all(args: argparse.Namespace) -> dict | None:
    """The four parts; the counts of faults injected and handled (None if the reference run failed)."""
    rng = random.Random(args.seed)
    started = time.monotonic()

    def log(line: str) -> None:
        print(line, flush=True)

    with tempfile.TemporaryDirectory(prefix="fault_injection_") as tmp:
        work = Path(tmp)
        log(f"uninterrupted reference run ({N_ITERS} steps, a checkpoint every {SNAPSHOT_FREQ})")
        reference_run = Launch(work / "reference", work / "logs" / "reference")
        startup_s = reference_run.wait_until(lambda: PROGRESS.search(reference_run.stderr))
        trained_s = reference_run.wait_until(lambda: reference_run.last_step() >= N_ITERS)
        if reference_run.wait() != 0:
            log(reference_run.stderr[-3000:])
            return None
        step_s = (trained_s - startup_s) / N_ITERS
        reference = final_state(work / "reference")
        log(f"  start-up {startup_s:.1f} s, {step_s:.2f} s per step")

        log(f"1. SIGKILL at {args.kills} random moments (seed {args.seed})")
        kills = kill_campaign(args.kills, rng, reference, startup_s, step_s, work, log)
        log("2. damaged checkpoints")
        damage_cases, damage_handled = checkpoint_damage(work / "reference", reference, work, log)
        log(f"5. {args.flips} random bit flips each in a checkpoint and in exported weights")
        flips = bit_flips(work / "reference", args.flips, rng, work)
        for kind, count in flips.items():
            log(f"  {kind}: {count['refused']} refused, {count['unchanged']} loaded unchanged, "
                f"{count['silent']} loaded changed")
        cost = digest_cost(work)
        log(f"  digest cost: checkpoint ({cost['checkpoint_mb']:.1f} MB) {cost['checkpoint_verified']:.3f} s "
            f"verified vs {cost['checkpoint_plain']:.3f} s plain; weights {cost['weights_verified']:.3f} s vs "
            f"{cost['weights_plain']:.3f} s")
        log(f"6. a second trainer on the workdir of a running one ({args.writer_trials} trials)")
        writer_trials, writers_held = two_writers(args.writer_trials, reference, work, log)
        log("7. divergence with a finite loss: resumed at a learning rate far too large")
        diverging, diverging_held = divergence(work / "reference", work, log)
        log("8. operating-system errors")
        os_cases, os_held = os_errors(work / "reference", work, log)
        log("3. damaged dataset files")
        data_cases = data_damage_commands(work)
        data_handled = answer_all(data_cases, args.jobs, log)
        log("4. bad input (sde.testing.BAD_INPUTS)")
        bad_cases = []
        for index, bad in enumerate(BAD_INPUTS[:args.bad_inputs or None]):
            case_dir = work / "bad" / str(index)
            case_dir.mkdir(parents=True)
            bad_cases.append((bad.name, cli_command(bad, case_dir), bad.match))
        bad_handled = answer_all(bad_cases, args.jobs, log)

    result = {"n_iters": N_ITERS, "snapshot_freq": SNAPSHOT_FREQ, "kill_seed": args.seed,
              "kills": kills.kills, "kills_in_startup": kills.kills_in_startup, "resumed": kills.resumed,
              "checkpoints_lost": kills.checkpoints_lost, "largest_setback": kills.largest_setback,
              "corrupt_files": kills.corrupt_files, "episodes": kills.episodes,
              "episodes_exact": kills.episodes_exact, "damaged_checkpoints": damage_cases,
              "damaged_checkpoints_handled": damage_handled, "damaged_data_files": len(data_cases),
              "damaged_data_files_handled": data_handled, "bad_inputs": len(bad_cases),
              "bad_inputs_handled": bad_handled, "bit_flips": flips, "digest_cost": cost,
              "startup_s": startup_s, "writer_trials": writer_trials,
              "writers_held": writers_held, "diverging_runs": diverging, "diverging_held": diverging_held,
              "os_errors": os_cases, "os_errors_held": os_held, "wall_time_s": time.monotonic() - started}
    result["all_handled"] = (kills.resumed == kills.kills and kills.checkpoints_lost == 0
                             and kills.corrupt_files == 0 and kills.episodes_exact == kills.episodes
                             and damage_handled == damage_cases and data_handled == len(data_cases)
                             and bad_handled == len(bad_cases)
                             and all(count["silent"] == 0 for count in flips.values())
                             and writers_held == writer_trials and diverging_held == diverging
                             and os_held == os_cases)
    return result


def readme_rows(result: dict) -> list[tuple[str, int, int]]:
    """(fault, cases, held) per class of fault: the README's table (tests/test_bench.py checks
    that README.md shows the current result)."""
    flips = result["bit_flips"]
    return [
        ("SIGKILL at a random moment, then the same command", result["kills"],
         min(result["resumed"], result["kills"] - result["checkpoints_lost"])),
        ("damaged or wrong newest checkpoint (truncated, garbage, empty, pickled code, bit flip, bare tensor, "
         "no EMA, NaN weights, all damaged)", result["damaged_checkpoints"], result["damaged_checkpoints_handled"]),
        ("one random bit flipped in a checkpoint", flips["checkpoint"]["flips"],
         flips["checkpoint"]["flips"] - flips["checkpoint"]["silent"]),
        ("one random bit flipped in exported weights", flips["weights"]["flips"],
         flips["weights"]["flips"] - flips["weights"]["silent"]),
        ("a second trainer (and a sampler) on a running trainer's workdir", result["writer_trials"],
         result["writers_held"]),
        ("a learning rate far too large (finite loss, exploding weights)", result["diverging_runs"],
         result["diverging_held"]),
        ("operating-system errors (unreadable data, unwritable checkpoints, full disk, SIGTERM in sampling)",
         result["os_errors"], result["os_errors_held"]),
        ("damaged data files", result["damaged_data_files"], result["damaged_data_files_handled"]),
        ("bad config values, names, files and resumes under another config", result["bad_inputs"],
         result["bad_inputs_handled"]),
    ]


def render(result: dict) -> str:
    rows = [
        ("SIGKILL at a random moment, same command rerun", result["kills"],
         f"{result['resumed']} resumed from the newest checkpoint ({result['kills_in_startup']} killed during "
         "start-up)"),
        (f"checkpoints lost beyond snapshot_freq = {result['snapshot_freq']}", result["kills"],
         f"{result['checkpoints_lost']} lost (largest setback {result['largest_setback']} steps); "
         f"{result['corrupt_files']} corrupt files left"),
        ("killed-and-resumed runs run to the end", result["episodes"],
         f"{result['episodes_exact']} bit-identical to the uninterrupted run"),
        ("damaged checkpoints (truncated, garbage, empty, pickled callable, killed write, a bit flipped "
         "in a tensor, a bare tensor, no EMA, NaN weights, all)",
         result["damaged_checkpoints"],
         f"{result['damaged_checkpoints_handled']} skipped with a warning, resumed from the one before, ended "
         "bit-identical, nothing in the files ran"),
        *[(f"one random bit flipped in {'a checkpoint' if kind == 'checkpoint' else 'exported weights'}",
           count["flips"],
           f"{count['silent']} loaded changed; {count['refused']} refused, {count['unchanged']} loaded unchanged "
           "(a bit the content does not depend on)") for kind, count in result["bit_flips"].items()],
        ("a second trainer on the workdir of a running one", result["writer_trials"],
         f"{result['writers_held']} refused with exit 2 naming the first, which ended bit-identical; a "
         "`--mode sample` beside them ran"),
        (f"resumed at a learning rate far too large (lr {', '.join(f'{lr:g}' for lr in DIVERGING_LRS)}; a "
         "checkpoint every step)", result["diverging_runs"],
         f"{result['diverging_held']} stopped with one line and exit 1, every checkpoint byte-identical"),
        ("operating-system errors (data file unreadable, checkpoints/ not writable, disk full during a "
         "checkpoint write, SIGTERM during sampling)", result["os_errors"],
         f"{result['os_errors_held']} answered with one line naming the path (exit 2), nothing written lost, "
         "no temporary file left"),
        ("damaged dataset files (truncated, bit flip, empty, garbage)", result["damaged_data_files"],
         f"{result['damaged_data_files_handled']} answered with one line and exit code 2"),
        ("bad configs and inputs (`sde.testing.BAD_INPUTS`)", result["bad_inputs"],
         f"{result['bad_inputs_handled']} answered with one line and exit code 2"),
    ]
    intro = (f"`python main.py --mode train` on `configs/tiny.py` ({result['n_iters']} steps, a checkpoint "
             f"every {result['snapshot_freq']}), one thread per process, kill moments from seed "
             f"{result['kill_seed']}; {result['wall_time_s']:.0f} s in all.")
    reading = ("Every injected fault was handled as required." if result["all_handled"] else
               "Not every fault was handled: see the rows whose outcome falls short of their cases.")
    cost = result["digest_cost"]
    digest = (f"Verifying the digest on load: a checkpoint of the release's size ({cost['checkpoint_mb']:.1f} MB: "
              f"U-Net, EMA, Adam state) loads in {cost['checkpoint_verified']:.3f} s against "
              f"{cost['checkpoint_plain']:.3f} s for `torch.load` alone; the released weights in "
              f"{cost['weights_verified']:.3f} s against {cost['weights_plain']:.3f} s; a training run's start-up "
              f"(to its first step, tiny config) takes {result['startup_s']:.1f} s.")
    return "\n".join([intro, "", table(["fault injected", "cases", "outcome"], [list(r) for r in rows]), "",
                      format_reading([reading, digest])])


if __name__ == "__main__":
    sys.exit(main())
