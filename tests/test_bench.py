"""The benchmarks as a package, their results files, and BENCHMARKS.md generated from them.

BENCHMARKS.md must be exactly what ``python -m bench.report`` makes of ``bench/results/``
(so a results file edited without regenerating fails here); every results file carries its
name, title, exact command, machine and date, and no path of the machine that ran it;
every benchmark module imports and answers ``--help``, and none edits ``sys.path``.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from bench import report

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
REQUIRED = ("name", "title", "command", "machine", "date")
#: A path of the machine that ran a benchmark: absolute, home-relative or above the repository.
MACHINE_PATH = re.compile(r"(?:^|[\s=`'\"(,:])(/(?!\s)[\w.~-]+/|~/|\.\./)")
#: The command forms a results file may name: a benchmark module, or main.py for an eval.
COMMAND = re.compile(r"^python (-m bench\.[\w.]+|main\.py)( |$)")


def bench_modules() -> list[str]:
    """Every module of the bench package, by dotted name."""
    return sorted(".".join(path.relative_to(ROOT).with_suffix("").parts) for path in BENCH.rglob("*.py")
                  if path.name != "__init__.py")


def results_files() -> list[Path]:
    return sorted(RESULTS.glob("*.json"))


def strings(value):
    """Every string inside a JSON value (keys included)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def machine_paths(value) -> list[str]:
    return [text for text in strings(value) if MACHINE_PATH.search(text)]


def test_benchmarks_md_is_what_the_report_generates():
    assert (ROOT / "BENCHMARKS.md").read_text() == report.build(), (
        "BENCHMARKS.md differs from the results files: run python -m bench.report")


def test_the_report_changes_with_a_results_file(tmp_path):
    """A number edited in a results file shows in the generated file, table and reading alike."""
    for path in results_files():
        (tmp_path / path.name).write_text(path.read_text())
    result = json.loads((RESULTS / "likelihood_speed.json").read_text())
    result["speedup"] = 7.77
    result["default"]["nfe"] = 77
    (tmp_path / "likelihood_speed.json").write_text(json.dumps(result))
    text = report.build(tmp_path)
    assert text != report.build()
    assert "7.77x faster" in text and "| 77 |" in text


def test_every_results_file_has_a_section_and_every_section_a_module():
    names = {path.stem for path in results_files()}
    awaiting = set(report.AWAITING) - names  # registered, not yet measured (a GPU's check)
    assert names | awaiting == set(report.PROTOCOL + report.INVESTIGATIONS), (
        "results files without a section, or sections without a results file")
    assert all(f"bench.{name}" in report.build() for name in awaiting)
    text = report.build()
    for path in results_files():
        result = json.loads(path.read_text())
        assert f"## {result['title']}\n" in text
        assert f"bench.{'investigations.' if path.stem in report.INVESTIGATIONS else ''}{path.stem}" in bench_modules()


@pytest.mark.parametrize("path", results_files(), ids=lambda path: path.stem)
def test_results_file_has_the_required_fields(path):
    result = json.loads(path.read_text())
    missing = [key for key in REQUIRED if not result.get(key)]
    assert not missing, f"{path.name} lacks {missing}"
    assert result["name"] == path.stem
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", result["date"]), result["date"]
    assert isinstance(result["machine"], dict) and ("cpu" in result["machine"] or "note" in result["machine"])
    for part in [result] + result.get("supplements", []):
        assert part.get("command") or part.get("source"), f"{path.name}: a part says nothing of its origin"
        if part.get("command"):
            assert COMMAND.match(part["command"]), part["command"]
        assert part.get("date") and part.get("machine"), f"{path.name}: a part without date or machine"


def test_nothing_under_results_names_a_path_of_the_machine():
    files = [path for path in RESULTS.rglob("*.json")]
    assert len(files) > len(results_files()), "the run stores were not found"
    found = {str(path.relative_to(ROOT)): machine_paths(json.loads(path.read_text())) for path in files}
    assert not {name: paths for name, paths in found.items() if paths}


def test_the_path_check_sees_machine_paths():
    work, shared = "/" + "work/", ".." + "/shared/"  # spelled apart: the repository holds no such path
    for text in (f"{work}runs/release/checkpoints/checkpoint_6000.pt", f"{shared}DESIGN.md",
                 "--workdir /tmp/run", f"schedule={work}notes/a.json", "python -m bench.x --out=/tmp/y"):
        assert machine_paths({"command": text}), text
    for text in ("release/mnist_vp_release.safetensors", "python -m bench.x --nfe 10 20", "1 / a_ts",
                 "bench/results/sampler_quality/align_steps_10steps_eps0.02.json", "sigma/alpha"):
        assert not machine_paths({"command": text}), text


def test_benchmarks_md_is_short_and_names_no_machine_path():
    text = (ROOT / "BENCHMARKS.md").read_text()
    sections = len(report.PROTOCOL) + len(report.INVESTIGATIONS)
    assert text.count("\n") < 28 * sections  # a screenful a section, about
    assert not MACHINE_PATH.findall(text.replace("](#", "]("))
    assert not re.search(r"\bsession \d+|goal[s]? (?:met|not met)|: (?:not )?met\b", text, re.IGNORECASE)


@pytest.mark.parametrize("module", bench_modules())
def test_bench_module_imports_and_answers_help(module, monkeypatch):
    """``python -m bench.<name> --help`` (in this process: runpy, as ``-m`` runs it)."""
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    output = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(output):
        warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules": it is imported above
        try:
            namespace = runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            assert stop.code in (0, None), f"{module} --help exited with {stop.code}"
            assert "usage:" in output.getvalue()
            return
    assert "main" not in namespace, f"{module} has a main() that --help did not reach"


def test_no_bench_module_edits_sys_path():
    offenders = [str(path.relative_to(ROOT)) for path in BENCH.rglob("*.py") if "sys.path" in path.read_text()]
    assert not offenders, f"sys.path edited in {offenders}: run benchmarks as python -m bench.<name>"


def test_results_files_render_without_their_optional_parts():
    """Each section renders from a results file of a fresh run: no supplements, no notes."""
    for path in results_files():
        result = json.loads(path.read_text())
        bare = copy.deepcopy(result)
        bare.pop("supplements", None)
        bare.pop("note", None)
        assert report.section(path.stem, bare).startswith(f"## {result['title']}")


@pytest.mark.slow
def test_the_gpu_check_runs_its_small_check_on_a_cpu():
    """Every stage of ``python -m bench.gpu_check`` (train bf16 and fp16, SIGTERM and resume,
    every sampler, eval, torchrun), at the small size, passes on this machine."""
    completed = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--small", "--no-write"], cwd=ROOT,
                               capture_output=True, text=True, timeout=900)
    lines = completed.stdout.splitlines()
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    stages = [line[6:22].strip() for line in lines if line.startswith(("PASS", "FAIL"))]
    assert stages == ["train bf16", "train fp16", "stop and resume", "sample", "eval", "torchrun"]
    assert all(line.startswith("PASS") for line in lines if line[6:22].strip() in stages)


def test_the_readme_fault_table_is_the_current_result():
    """README.md's reliability table shows bench/results/fault_injection.json, row by row."""
    from bench.fault_injection import NAME, readme_rows

    result = json.loads((RESULTS / f"{NAME}.json").read_text())
    readme = (ROOT / "README.md").read_text()
    for fault, cases, held in readme_rows(result):
        assert f"| {fault} | {cases} | {held} |" in readme, f"README.md lacks the row: {fault} | {cases} | {held}"


def test_the_multistep_likelihood_converges_to_the_adaptive_solution_at_its_orders():
    """bench.investigations.likelihood_multistep on Gaussian data with its exact noise
    predictor approaches the toolkit's adaptive solution at tight tolerance (itself checked
    against closed forms in test_likelihood.py). From eps = 1e-3, where the log-density rate
    vanishes at both ends, the third-order x update sets the pace (errors / 8 per doubling of
    the steps; a half-weighted second difference gives / 4); from eps = 0.1 the trapezoid for
    delta does (/ 4; a rectangle rule gives / 2)."""
    from bench.investigations.likelihood_multistep import multistep_log_likelihood
    from sde import likelihood
    from sde.sdes import VPSDE
    from sde.testing import GaussianMixtureOracle

    sde = VPSDE()
    oracle = GaussianMixtureOracle.gaussian(sde, [0.3] * 4, [0.2] * 4)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3
    probe = 2.0 * torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(1)).double() - 1.0
    for eps, steps, least_ratio in ((1e-3, (20, 40, 80), 6.0), (0.1, (40, 80, 160), 3.0)):
        reference, _ = likelihood.ode_log_likelihood(oracle, sde, x, probe=probe, eps=eps, rtol=1e-9, atol=1e-9)
        errors = []
        for count in steps:
            logp, nfe = multistep_log_likelihood(oracle, sde, x, probe, eps=eps, steps=count)
            assert nfe == count + 1
            errors.append((logp - reference).abs().max().item())
        assert errors[0] / errors[1] > least_ratio and errors[1] / errors[2] > least_ratio, (eps, errors)
