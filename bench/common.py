"""What the benchmark scripts share: loading a config file, the machine line, BENCHMARKS.md."""
from __future__ import annotations

import datetime
import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "BENCHMARKS.md"


def load_config(path: str):
    """``get_config()`` of a config file (configs/*.py)."""
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """Date, CPU, core count, torch version and threads: what a benchmark figure depends on."""
    return (f"{datetime.date.today().isoformat()}; {cpu_model()} ({os.cpu_count()} cores, "
            f"{platform.machine()}); torch {torch.__version__}, {torch.get_num_threads()} threads")


def add_run_options(parser) -> None:
    """The options every benchmark shares: ``--threads`` and ``--no-append``."""
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-append", action="store_true", help="do not append to BENCHMARKS.md")


def apply_threads(args) -> None:
    """Set torch's thread count from ``--threads`` (0 keeps torch's default)."""
    if args.threads:
        torch.set_num_threads(args.threads)


def paired_difference(difference) -> str:
    """Mean ± standard error of per-image differences (a 1-d tensor) between two settings
    measured on the same images with the same noise: the paired comparison."""
    return f"{difference.mean().item():+.4f} ± {difference.std().item() / len(difference) ** 0.5:.4f}"


def command_line() -> str:
    """How this benchmark was invoked, for its BENCHMARKS.md section: ``python bench/<script>.py
    <arguments>`` (the script's path relative to the repository)."""
    script = Path(sys.argv[0]).resolve().relative_to(REPO)
    return " ".join(["python", str(script)] + sys.argv[1:])


def publish(args, title: str, body: str, images: Sequence[Path] = ()) -> None:
    """Print a benchmark's result and, unless ``--no-append``, append it to BENCHMARKS.md
    under ``title`` with the command that produced it."""
    print(body)
    if not args.no_append:
        append_to_benchmarks(title, command_line(), body, images)


def append_to_benchmarks(title: str, command: str, body: str, images: Sequence[Path] = ()) -> None:
    """Append a section (heading, command, machine, table, plots) to BENCHMARKS.md."""
    section = [f"\n## {title}\n", f"`{command}`  \n{machine_line()}\n\n", body.rstrip() + "\n"]
    for image in images:
        section.append(f"\n![{title}]({Path(image).resolve().relative_to(REPO)})\n")
    if not BENCHMARKS.exists():
        BENCHMARKS.write_text("# Benchmarks\n\nEvery table below was appended by the script named "
                              "above it, on the machine and date stated.\n")
    with BENCHMARKS.open("a") as handle:
        handle.write("".join(section))
