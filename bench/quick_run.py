"""The first run of the README, timed and judged: do its samples show digits?

    python -m bench.quick_run                 # trains configs/mnist_quick.py: about 8 minutes

Runs the README's first command, ``python main.py --config configs/mnist_quick.py --mode
train``, in a fresh workdir exactly as a user would (a subprocess, the machine's threads),
and times it from start to exit. Then ``--mode sample`` draws 100 digits with the config's
sampler and the toolkit's MNIST classifier (``evaluation/assets``) judges them: the bar a
newcomer's run must clear is all ten classes among the 100 and a mean classifier confidence
of at least ``CONFIDENCE_BAR``. The grid of 64 samples the training run wrote at its last
step becomes the README's picture (``docs/mnist_quick_samples.png``).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import REPO, add_write_options, format_reading, table, write_result

NAME, TITLE = "quick_run", "The README's first run: how soon digits show"
CONFIG = "configs/mnist_quick.py"
NUM_SAMPLES = 100
CONFIDENCE_BAR = 0.8
PICTURE = REPO / "docs" / "mnist_quick_samples.png"


def timed(command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_write_options(parser)
    args = parser.parse_args()
    from configs.mnist_quick import get_config
    from evaluation import classifier_metrics
    from sde.models import count_parameters, create_model

    config = get_config()
    with tempfile.TemporaryDirectory(prefix="quick_run_") as tmp:
        workdir = Path(tmp) / "mnist_quick"
        base = [sys.executable, "main.py", "--config", CONFIG, f"--workdir={workdir}"]
        train_s, _ = timed([*base, "--mode=train"])
        sample_s, _ = timed([*base, "--mode=sample", f"--config.sampling.num_samples={NUM_SAMPLES}"])
        npz = next((workdir / "samples").glob("*.npz"))
        with np.load(npz) as saved:
            images = saved["images"]
        metrics = classifier_metrics(images)
        grid = workdir / "samples" / f"train_step_{config.training.n_iters}.png"
        if not args.no_write:
            PICTURE.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(grid, PICTURE)
    classes = int(np.count_nonzero(metrics["class_histogram"]))
    result = {"config": CONFIG, "steps": config.training.n_iters, "batch_size": config.training.batch_size,
              "parameters": count_parameters(create_model(config)),
              "train_wall_s": train_s, "sample_wall_s": sample_s, "sampler": config.sampling.method,
              "sampler_steps": config.sampling.steps, "num_samples": NUM_SAMPLES,
              "mean_confidence": metrics["mean_confidence"], "classes": classes,
              "class_histogram": metrics["class_histogram"], "confidence_bar": CONFIDENCE_BAR,
              "passed": classes == 10 and metrics["mean_confidence"] >= CONFIDENCE_BAR,
              "picture": str(PICTURE.relative_to(REPO))}
    write_result(args, NAME, TITLE, result, render)
    return 0 if result["passed"] else 1


def render(result: dict) -> str:
    rows = [["training (the README's first command, start to exit)", f"{result['train_wall_s'] / 60:.1f} min",
             f"{result['steps']:,} steps of batch {result['batch_size']}, {result['parameters']:,} parameters"],
            [f"sampling {result['num_samples']} digits ({result['sampler']}, {result['sampler_steps']} steps)",
             f"{result['sample_wall_s']:.0f} s", ""],
            ["mean classifier confidence", f"{result['mean_confidence']:.3f}", f"bar: {result['confidence_bar']}"],
            ["classes among the samples", f"{result['classes']} of 10", f"histogram {result['class_histogram']}"]]
    verdict = ("The run clears the bar: digits of every class, recognised with confidence."
               if result["passed"] else "The run does not clear the bar.")
    return "\n".join([f"`{result['config']}` from a fresh workdir; the grid of its last step is "
                      f"`{result['picture']}`.", "", table(["stage", "measured", "detail"], rows), "",
                      format_reading([verdict])])


if __name__ == "__main__":
    sys.exit(main())
