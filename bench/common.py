"""What the benchmarks share: loading a config file, the machine description, the results files.

Every benchmark ends with ``write_result``: it prints the section that ``python -m
bench.report`` will make of the result and, unless ``--no-write``, writes
``bench/results/<name>.json``, the result with its name, title, exact command, machine and
date. BENCHMARKS.md is generated from those files (``bench/report.py``); nothing appends to it.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from sde.environment import cpu_model

REPO = Path(__file__).resolve().parents[1]
#: Where the results files live (one ``<name>.json`` per benchmark, its plot ``<name>.png``).
RESULTS = REPO / "bench" / "results"


def load_config(path: str):
    """``get_config()`` of a config file (configs/*.py)."""
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def machine() -> dict[str, Any]:
    """CPU, core count, torch version and threads: what a benchmark figure depends on."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "arch": platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def machine_text(described: dict[str, Any]) -> str:
    """One line of a ``machine()`` dict; a dict with only a ``note`` is that note."""
    if "cpu" not in described:
        return described.get("note", "machine not recorded")
    cores = f"{described['cores']} cores" + (f", {described['arch']}" if described.get("arch") else "")
    text = f"{described['cpu']} ({cores})"
    if described.get("torch"):
        threads = described.get("threads")
        text += f"; torch {described['torch']}" + (f", {threads} thread{'s' if threads != 1 else ''}" if threads else "")
    return text + (f" ({described['note']})" if described.get("note") else "")


def repo_relative(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it, else unchanged."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except (ValueError, OSError):
        return str(path)


#: Options that say where a result goes, not what is measured: left out of the recorded command.
OUTPUT_OPTIONS = ("--results-dir", "--no-write")


def command_line(argv: list[str] | None = None) -> str:
    """How this benchmark was invoked: ``python -m bench.<module> <arguments>``, with the
    arguments that name files inside the repository made relative to it, and without
    ``OUTPUT_OPTIONS``."""
    argv = sys.argv if argv is None else argv
    module = ".".join(Path(repo_relative(argv[0])).with_suffix("").parts)
    arguments, skip = [], False
    for argument in argv[1:]:
        if skip:
            skip = False
            continue
        name = argument.split("=", 1)[0]
        if name in OUTPUT_OPTIONS:
            skip = name == "--results-dir" and "=" not in argument
            continue
        key, equals, value = argument.rpartition("=") if argument.startswith("--") else ("", "", argument)
        if value.startswith("/") and Path(value).exists():
            value = repo_relative(value)
        arguments.append(f"{key}{equals}{value}")
    return shlex.join(["python", "-m", module] + arguments)


def add_run_options(parser) -> None:
    """The options every benchmark shares: ``--threads``, ``--no-write`` and ``--results-dir``."""
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add_write_options(parser)


def add_write_options(parser) -> None:
    """``--no-write`` (print only) and ``--results-dir`` (where ``<name>.json`` goes)."""
    parser.add_argument("--no-write", action="store_true",
                        help="print the result only; do not write bench/results/<name>.json")
    parser.add_argument("--results-dir", default=str(RESULTS),
                        help="where the results file (and plot) go (default: bench/results)")


def apply_threads(args) -> None:
    """Set torch's thread count from ``--threads`` (0 keeps torch's default)."""
    if args.threads:
        torch.set_num_threads(args.threads)


def paired(difference) -> tuple[float, float]:
    """Mean and standard error of per-image differences (a 1-d tensor) between two settings
    measured on the same images with the same noise: the paired comparison."""
    return difference.mean().item(), difference.std().item() / len(difference) ** 0.5


def plot_path(args, name: str) -> Path:
    """Where benchmark ``name`` draws its plot: ``<results dir>/<name>.png``."""
    directory = Path(args.results_dir)
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{name}.png"


def write_result(args, name: str, title: str, result: dict[str, Any],
                 render: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """Complete ``result`` with name, title, command, machine and date; print the section
    ``render`` makes of it; unless ``--no-write``, write ``<results dir>/<name>.json``."""
    full = {"name": name, "title": title, "command": command_line(), "machine": machine(),
            "date": datetime.date.today().isoformat(), **result}
    print(provenance(full) + "\n\n" + render(full))
    if not args.no_write:
        directory = Path(args.results_dir)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{name}.json"
        path.write_text(json.dumps(full, indent=1, ensure_ascii=False) + "\n")
        print(f"\nwrote {repo_relative(path)}; regenerate BENCHMARKS.md with python -m bench.report")
    return full


# ---- rendering helpers (used by the benchmarks' ``render``) --------------------------------

def provenance(result: dict[str, Any]) -> str:
    """The exact command, then machine and date, of a result (or of one of its supplements)."""
    command = f"`{result['command']}`" if result.get("command") else result.get("source", "")
    return f"{command}  \n{result['date']}; {machine_text(result['machine'])}"


def model_text(model: dict[str, Any]) -> str:
    """``release/x.safetensors (step N)``, or the description of weights no longer shipped."""
    text = f"`{model['checkpoint']}`" if model["checkpoint"].endswith((".safetensors", ".pt")) else model["checkpoint"]
    return text + (f" (step {model['step']:,})" if model.get("step") and "steps" not in text else "")


def network_digest(model: torch.nn.Module) -> str:
    """10 hex digits of the SHA-256 of a network's tensors (``sde.checkpoint.content_digest``):
    the key of stored benchmark runs. Samples depend on the tensors alone; a weight file's bytes
    change with its metadata too (a digest or a config key added), which must not void runs."""
    from sde.checkpoint import content_digest

    return content_digest(model.state_dict()).removeprefix("sha256:")[:10]


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_se(mean: float, standard_error: float, digits: int = 4, sign: str = "") -> str:
    """``mean ± standard error``, both to ``digits`` decimals (``sign="+"`` signs the mean)."""
    return f"{mean:{sign}.{digits}f} ± {standard_error:.{digits}f}"


def format_reading(lines: list[str]) -> str:
    """The reading of a section: its findings, one bullet each."""
    return "**Reading.**\n" + "\n".join(f"- {line}" for line in lines)


#: Footnote markers of the runs a section's tables take from its supplements.
MARKERS = "¹²³⁴⁵⁶⁷⁸⁹"


def footnotes(supplements: list[dict]) -> tuple[list[str], list[str]]:
    """A marker per supplement, and a line per supplement giving its title and provenance."""
    markers = [MARKERS[index] for index in range(len(supplements))]
    lines = [f"- {marker} {supplement['title']}: " + provenance(supplement).replace("  \n", "; ")
             + (f". {supplement['note']}" if supplement.get("note") else "")
             for marker, supplement in zip(markers, supplements)]
    return markers, lines
