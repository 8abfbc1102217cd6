"""The GPU path end to end in one command: train (bf16, fp16), stop and resume, sample with
every sampler, evaluate, and train under torchrun; one pass/fail line per stage.

    python -m bench.gpu_check              # on a GPU: a few minutes; on a CPU: the small check
    python -m bench.gpu_check --small      # the small check anywhere (what CI runs on a CPU)

Stages, each through the toolkit's own entry points:

1. ``train bf16`` and ``train fp16``: ``python main.py --mode train`` with
   ``training.amp`` = bf16 and fp16 (fp16 with its gradient scaler) in fresh workdirs;
   training images/s from the run's summary.
2. ``stop and resume``: a training process gets SIGTERM after its first checkpoint; it must
   save and exit 0, and the same command must resume from that checkpoint to the end.
3. ``sample``: every sampler of ``sde.samplers`` on the bf16 run's weights (``sde.load``);
   sampling images/s.
4. ``eval``: ``--mode eval``: held-out loss, bits/dim by the probability-flow ODE and the
   ELBO, FID / KID of generated samples.
5. ``torchrun``: the training of stage 1 under ``torchrun --nproc_per_node=1`` (NCCL on a GPU,
   gloo on a CPU).

On a GPU the check uses ``configs/mnist_vp.py`` at full size (300 steps per training run, 64
held-out images for bits/dim, FID of 1,000 samples); elsewhere, or with ``--small``,
``configs/tiny.py`` with a few steps and samples, so that its logic runs in CI. Exit code 1
if a stage fails. On a GPU it writes ``bench/results/gpu_check.json`` (``--no-write``: print
only).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from bench.common import REPO, add_write_options, load_config, write_result

NAME = "gpu_check"
TITLE = "GPU check: train, resume, sample, evaluate"

#: (config, training steps, sampling steps, samples per sampler, held-out images, FID samples,
#: reference images, sampling batch) of the full check and of the small one.
SIZES = {"full": ("configs/mnist_vp.py", 300, 20, 256, 64, 1000, 10000, 250),
         "small": ("configs/tiny.py", 6, 4, 4, 2, 8, 16, 8)}


def main_command(config: str, mode: str, workdir: Path, *overrides: str, torchrun: bool = False) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] \
        if torchrun else [sys.executable]
    return [*launcher, "main.py", "--config", config, "--mode", mode, f"--workdir={workdir}", *overrides]


def run_main(command: list[str]) -> subprocess.CompletedProcess:
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ})
    if completed.returncode != 0:
        last = (completed.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"exit code {completed.returncode}: {last}")
    return completed


def training_overrides(steps: int, amp: str, snapshot: int | None = None) -> list[str]:
    return [f"--config.training.n_iters={steps}", f"--config.training.amp={amp}",
            f"--config.training.snapshot_freq={snapshot or steps}", f"--config.training.sample_freq={steps}",
            f"--config.training.log_freq={max(1, min(50, steps))}", "--config.sampling.method=ddim",
            "--config.sampling.steps=2"]


def trained(workdir: Path, steps: int) -> dict[str, Any]:
    """The run's summary, checked: it reached ``steps`` with a finite loss."""
    summary = json.loads((workdir / "train_summary.json").read_text())
    if summary["step"] != steps or not torch.isfinite(torch.tensor(summary["last_loss"])):
        raise RuntimeError(f"stopped at step {summary['step']} of {steps}, last loss {summary['last_loss']}")
    return summary


def check(small: bool, scratch: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run every stage; returns (one record per stage, the measured speeds)."""
    config, steps, sample_steps, num_samples, heldout, fid_samples, reference, batch = SIZES[
        "small" if small else "full"]
    batch_size = load_config(str(REPO / config)).training.batch_size
    stages: list[dict[str, Any]] = []
    speeds: dict[str, Any] = {}

    def stage(name: str, body: Callable[[], str]) -> None:
        start = time.perf_counter()
        try:
            detail, passed = body(), True
        except Exception as error:  # a stage's failure is reported, and the next stage runs
            detail, passed = f"{type(error).__name__}: {error}".splitlines()[0], False
            if os.environ.get("SDE_TRACEBACK"):
                traceback.print_exc()
        stages.append({"stage": name, "passed": passed, "seconds": round(time.perf_counter() - start, 1),
                       "detail": detail})
        print(f"{'PASS' if passed else 'FAIL'}  {name:<16} {stages[-1]['seconds']:7.1f} s  {detail}", flush=True)

    def train(amp: str) -> str:
        workdir = scratch / f"train_{amp}"
        run_main(main_command(config, "train", workdir, *training_overrides(steps, amp)))
        summary = trained(workdir, steps)
        speeds[f"train_{amp}_images_per_s"] = steps * batch_size / summary["wall_time_s"]
        return (f"{steps} steps, {speeds[f'train_{amp}_images_per_s']:.0f} images/s, "
                f"{summary['host_syncs_per_step']:.2f} host syncs per step, device "
                f"{summary['environment']['device']} ({summary['environment']['device_name']})")

    def stop_and_resume() -> str:
        # a run long enough to be stopped by the signal, snapshots every ``every`` steps
        workdir, every, long_run = scratch / "resume", max(2, steps // 3), 100 * steps
        command = main_command(config, "train", workdir, *training_overrides(long_run, "bf16", snapshot=every))
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 600
        while not list((workdir / "checkpoints").glob("checkpoint_*.pt")) and process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("no checkpoint within 10 minutes")
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=600)
        if process.returncode != 0:
            raise RuntimeError(f"SIGTERM: exit code {process.returncode}: {errors.strip().splitlines()[-1:]}")
        summary = json.loads((workdir / "train_summary.json").read_text())
        saved = summary["step"]
        if summary["interrupted"] != "SIGTERM" or saved >= long_run:
            raise RuntimeError(f"the run was not stopped by the signal (step {saved}, {summary['interrupted']})")
        target = saved + every
        resumed = run_main(main_command(config, "train", workdir, *training_overrides(target, "bf16", snapshot=every)))
        trained(workdir, target)
        if f"(step {saved})" not in resumed.stdout:
            raise RuntimeError(f"the second run did not resume from step {saved}")
        return f"stopped by SIGTERM at step {saved} (checkpoint saved, exit 0), resumed to step {target}"

    def sample_every_sampler() -> str:
        import sde

        pipe = sde.load(scratch / "train_bf16", device="auto")
        rates = {}
        for method in sde.samplers.available():
            start = time.perf_counter()
            x, info = pipe.sample(num_samples, method=method, steps=sample_steps, batch_size=batch)
            if pipe.device.type == "cuda":
                torch.cuda.synchronize()
            if not torch.isfinite(x).all():
                raise RuntimeError(f"{method}: non-finite samples")
            rates[method] = num_samples / (time.perf_counter() - start)
        speeds["sample_images_per_s"] = {method: round(rate, 1) for method, rate in rates.items()}
        return (f"{len(rates)} samplers at {sample_steps} steps, {num_samples} samples each, median "
                f"{statistics.median(rates.values()):.0f} images/s")

    def evaluate() -> str:
        workdir = scratch / "train_bf16"
        run_main(main_command(config, "eval", workdir, f"--config.eval.bpd_num_images={heldout}",
                              f"--config.eval.num_samples={fid_samples}", f"--config.eval.batch_size={batch}",
                              f"--config.eval.reference_num_images={reference}", "--config.eval.heldout_split=train5k",
                              "--config.sampling.method=dpm_solver", "--config.sampling.steps=20",
                              f"--config.sampling.batch_size={batch}"))
        report = json.loads(next((workdir / "eval").glob("report_step*.json")).read_text())
        values = [report["bpd_ode"]["mean"], report["bpd_elbo"]["mean"], report["samples"]["fid"]]
        if not all(torch.isfinite(torch.tensor(values))):
            raise RuntimeError(f"non-finite results {values}")
        speeds["eval"] = {"bpd_ode": values[0], "bpd_elbo": values[1], "fid": values[2],
                          "fid_samples": fid_samples, "reference_images": reference}
        return (f"bits/dim ODE {values[0]:.3f}, ELBO {values[1]:.3f} ({heldout} images); FID {values[2]:.2f} "
                f"({fid_samples} samples vs {reference})")

    def torchrun() -> str:
        workdir = scratch / "torchrun"
        run_main(main_command(config, "train", workdir, *training_overrides(steps, "bf16"), torchrun=True))
        summary = trained(workdir, steps)
        return f"{steps} steps in 1 process under torchrun, last loss {summary['last_loss']:.4f}"

    stage("train bf16", lambda: train("bf16"))
    stage("train fp16", lambda: train("fp16"))
    stage("stop and resume", stop_and_resume)
    stage("sample", sample_every_sampler)
    stage("eval", evaluate)
    stage("torchrun", torchrun)
    return stages, speeds


def render(result: dict[str, Any]) -> str:
    lines = [f"`{result['config']}` on {result['device']}; every stage as `python -m bench.gpu_check` runs it:", "",
             "| stage | result | seconds | detail |", "|---|---|---|---|"]
    for stage in result["stages"]:
        lines.append(f"| {stage['stage']} | {'pass' if stage['passed'] else 'FAIL'} | {stage['seconds']} | "
                     f"{stage['detail']} |")
    passed = sum(stage["passed"] for stage in result["stages"])
    lines += ["", "**Reading.**", f"- {passed} of {len(result['stages'])} stages pass."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="the small check (the default without a GPU)")
    add_write_options(parser)
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    small = args.small or not on_gpu
    with tempfile.TemporaryDirectory() as scratch:
        stages, speeds = check(small, Path(scratch))
    device = torch.cuda.get_device_name(0) if on_gpu else "the CPU"
    result = {"config": SIZES["small" if small else "full"][0], "device": device, "small": small,
              "stages": stages, "speeds": speeds}
    if on_gpu and not small:
        write_result(args, NAME, TITLE, result, render)
    else:
        print("\n" + render(result))
    sys.exit(0 if all(stage["passed"] for stage in stages) else 1)


if __name__ == "__main__":
    main()
