"""The real training loop of this tree against another commit's, interleaved on one machine.

    python -m bench.investigations.train_loop_ab --against <commit> --steps 30 --rounds 3

``bench.train_throughput`` times the network's training step alone; a change to the loop
around it (data prefetch, host synchronisations, checkpoints) shows only here. The script
checks out ``--against`` in a temporary git worktree and runs ``python main.py --mode train``
in both trees, alternating which goes first in each round, on the same config, steps and
seed, each in a fresh workdir. Images per second are the trained images over the run's
training wall time (``train_summary.json``; its final checkpoint and sample grid, kept
small, are in both). Writes ``bench/results/train_loop_ab.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import REPO, add_write_options, load_config, write_result

NAME = "train_loop_ab"
TITLE = "Training loop against an earlier commit"


def train_images_per_second(tree: Path, workdir: Path, config: str, steps: int) -> float:
    """Images/s of ``steps`` training steps of ``tree``'s ``main.py`` (a fresh process)."""
    overrides = [f"--config.training.n_iters={steps}", f"--config.training.snapshot_freq={steps}",
                 f"--config.training.sample_freq={steps}", f"--config.training.log_freq={steps}",
                 "--config.sampling.method=ddim", "--config.sampling.steps=2"]
    command = [sys.executable, "main.py", "--config", config, "--mode", "train", f"--workdir={workdir}", *overrides]
    environment = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run(command, cwd=tree, env=environment, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    summary = json.loads((workdir / "train_summary.json").read_text())
    batch = load_config(str(tree / config)).training.batch_size
    return steps * batch / summary["wall_time_s"]


def render(result: dict[str, Any]) -> str:
    ours, theirs = result["images_per_s"]["this tree"], result["images_per_s"][result["against"]]
    ratio = statistics.median(ours) / statistics.median(theirs)
    lines = [f"`{result['config']}`, {result['steps']} training steps per run, {result['rounds']} interleaved "
             f"rounds; images/s of the whole `--mode train` run:", "",
             "| tree | images/s per round | median |", "|---|---|---|"]
    for label, values in result["images_per_s"].items():
        lines.append(f"| {label} | {' / '.join(f'{v:.1f}' for v in values)} | {statistics.median(values):.1f} |")
    lines += ["", "**Reading.**",
              f"- This tree trains at {ratio:.3f}x the images/s of `{result['against']}` (medians; per round "
              f"{min(a / b for a, b in zip(ours, theirs)):.3f}-{max(a / b for a, b in zip(ours, theirs)):.3f}x)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="the commit to compare with (a git revision)")
    parser.add_argument("--config", default="configs/mnist_vp.py")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    add_write_options(parser)
    args = parser.parse_args()
    revision = subprocess.run(["git", "rev-parse", "--short", args.against], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        other = scratch / "other"
        subprocess.run(["git", "worktree", "add", "--detach", str(other), revision], cwd=REPO, check=True,
                       capture_output=True)
        try:
            trees = {"this tree": REPO, revision: other}
            measured: dict[str, list[float]] = {label: [] for label in trees}
            for round_index in range(args.rounds):
                order = list(trees) if round_index % 2 == 0 else list(reversed(trees))
                for label in order:
                    workdir = scratch / f"run_{round_index}_{label.replace(' ', '_')}"
                    measured[label].append(train_images_per_second(trees[label], workdir, args.config, args.steps))
                    print(f"round {round_index + 1}: {label} {measured[label][-1]:.1f} images/s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=REPO, check=False)
    result = {"against": revision, "config": args.config, "steps": args.steps, "rounds": args.rounds,
              "images_per_s": measured}
    write_result(args, NAME, TITLE, result, render)


if __name__ == "__main__":
    main()
