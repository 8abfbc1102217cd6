"""Discrete DDPM against the VP, sub-VP and VE SDEs on MNIST: one network, one budget.

    python -m bench.sde_comparison                        # about 2 hours on 2 cores
    python -m bench.sde_comparison --steps 20 --samples 50 --bpd-images 4 --no-write \
        --workdir runs/sde_comparison_smoke               # a smoke run, a few minutes

Each formulation trains the same U-Net (``configs/mnist_quick.py``'s: base width 16, no
dropout) with the same recipe and the same number of optimizer steps, on the MNIST-10k data
of ``configs/mnist_vp.py``, from its config file:

- ``ddpm``  (configs/mnist_ddpm.py): L_simple on Ho et al.'s N = 1000 integer steps (their
  linear betas), the network fed t_i = i/N;
- ``vp``    (configs/mnist_vp.py): the continuous VP SDE (Song et al. 2021, eq. 11);
- ``subvp`` (configs/mnist_subvp.py): the sub-VP SDE (eq. 12);
- ``ve``    (configs/mnist_ve.py): the VE SDE (eq. 9), sigma in [0.01, 50], with the Fourier
  time embedding the VE config uses (as NCSN++ does).

Then, for each, from the CLI as a user would run it: ``--mode eval`` (bits/dim by the
probability-flow ODE and by the ELBO on ``--bpd-images`` held-out digits, and FID / KID of
``--samples`` ancestral samples at 100 steps) and ``--mode compare`` (the same number of
samples from DPM-Solver++ at 10 steps and, for the VE SDE, from predictor-corrector at 100
NFE, its sampler in Song et al. 2021; same per-sample seeds). At 100 NFE the table shows the
sampler with the lower FID. Each FID costs about two minutes of Inception on 2 cores, which
is what limits the runs per formulation. The discrete model samples on its own
grid (``discrete=true``). The held-out digits and their noise are the same in every eval, so
bits/dim differences are paired image by image.

A stage whose output in ``--workdir`` matches these settings is not run again, and training
resumes from its last checkpoint (Ctrl-C lets it save one), so an interrupted run continues;
a workdir trained for another ``--steps`` is refused. Writes
``bench/results/sde_comparison.json`` and one picture with a sample grid per formulation
(``sde_comparison.png``: the 100-NFE ancestral samples of the eval).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import REPO, add_write_options, format_reading, load_config, paired, plot_path, repo_relative, \
    table, write_result

NAME, TITLE = "sde_comparison", "Discrete DDPM against the VP, sub-VP and VE SDEs on MNIST"
#: The formulations, by name: (config file, what it is).
FORMULATIONS = {
    "ddpm": ("configs/mnist_ddpm.py", "discrete DDPM (L_simple, N = 1000)"),
    "vp": ("configs/mnist_vp.py", "VP SDE"),
    "subvp": ("configs/mnist_subvp.py", "sub-VP SDE"),
    "ve": ("configs/mnist_ve.py", "VE SDE"),
}
#: The training recipe every formulation shares (configs/mnist_quick.py's network and
#: optimiser, a cosine learning-rate decay and a slower EMA for the longer run).
RECIPE = ("--config.model.nf=16", "--config.model.dropout=0.0", "--config.model.ema_rate=0.999",
          "--config.training.batch_size=64", "--config.training.lr=2e-3", "--config.training.warmup=50",
          "--config.training.lr_schedule=cosine", "--config.training.log_freq=100")
#: ``--mode eval``'s sampler (also one of the 100-NFE candidates) and ``--mode compare``'s runs.
EVAL_SAMPLER = ("ancestral", 100)
COMPARE_RUNS = ("dpm_solver:10",)
#: Runs of one formulation only: the VE SDE's predictor-corrector (100 NFE).
EXTRA_RUNS = {"ve": ("pc:50",)}


def run_cli(arguments: list[str], log: Path) -> float:
    """``python main.py <arguments>`` in the repository, its output appended to ``log``;
    returns the wall time. A failure stops the benchmark with the log's tail. On Ctrl-C the
    child (which has the signal too) is given time to save its checkpoint before this stops."""
    started = time.perf_counter()
    with open(log, "a") as handle:
        handle.write(f"\n$ python main.py {' '.join(arguments)}\n")
        handle.flush()
        child = subprocess.Popen([sys.executable, "main.py", *arguments], cwd=REPO, stdout=handle,
                                 stderr=subprocess.STDOUT)
        try:
            returncode = child.wait()
        except KeyboardInterrupt:
            child.wait(timeout=120)
            raise
    if returncode != 0:
        raise RuntimeError(f"python main.py {' '.join(arguments)} failed; see {log}:\n"
                           + log.read_text()[-3000:])
    return time.perf_counter() - started


def compare_runs(name: str) -> list[str]:
    """The compare entries of a formulation: the discrete model samples on its own grid, and
    the VE SDE also with its own sampler, predictor-corrector (Song et al. 2021, Table 1)."""
    runs = [f"{run}:discrete=true" if name == "ddpm" else run for run in COMPARE_RUNS]
    return runs + list(EXTRA_RUNS.get(name, ()))


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def train_stage(name: str, args, workdir: Path, base: list[str], log: Path, times: dict) -> dict:
    """Train to ``args.steps`` (resuming an interrupted run); refuses a workdir trained for
    another length, whose learning-rate schedule was not this one's."""
    saved = _load(workdir / "config.json")
    if saved is not None and saved["training"]["n_iters"] != args.steps:
        raise SystemExit(f"{workdir} holds a run of {saved['training']['n_iters']} steps, not --steps "
                         f"{args.steps}; give another --workdir")
    summary = _load(workdir / "train_summary.json")
    if summary is None or summary["step"] < args.steps:
        steps = [f"--config.training.n_iters={args.steps}", f"--config.training.snapshot_freq={args.steps}",
                 f"--config.training.sample_freq={args.steps}",
                 # the grid at the last step from a cheap sampler, so training times compare networks
                 "--config.sampling.method=dpm_solver", "--config.sampling.steps=20"]
        run_cli([*base, "--mode=train", *RECIPE, *steps], log)
        summary = _load(workdir / "train_summary.json")
        if summary["step"] != args.steps:
            raise SystemExit(f"{name}: training stopped at step {summary['step']} of {args.steps} "
                             f"({summary.get('interrupted') or 'see ' + str(log)}); run again to resume")
    times.setdefault("train_s", summary["total_wall_time_s"])
    return summary


def evaluate_formulation(name: str, args) -> dict:
    """Train, evaluate and compare one formulation in ``<workdir>/<name>``; returns its row.
    A stage whose output exists for these steps, samples and images is not run again."""
    config_file, _ = FORMULATIONS[name]
    workdir = Path(args.workdir) / name
    workdir.mkdir(parents=True, exist_ok=True)
    log, times_file = workdir / "bench.log", workdir / "bench_times.json"
    times = _load(times_file) or {}
    base = ["--config", config_file, f"--workdir={workdir}"]
    summary = train_stage(name, args, workdir, base, log, times)

    method, sampler_steps = EVAL_SAMPLER
    report_file = workdir / "eval" / f"report_step{args.steps}.json"
    report = _load(report_file)
    if report is None or report["samples"]["num_samples"] != args.samples \
            or report["heldout"]["num_images"] != args.bpd_images:
        times["eval_s"] = run_cli([*base, "--mode=eval", *RECIPE, f"--config.sampling.method={method}",
                                   f"--config.sampling.steps={sampler_steps}",
                                   f"--config.eval.num_samples={args.samples}",
                                   f"--config.eval.bpd_num_images={args.bpd_images}"], log)
        report = _load(report_file)

    compare_file = workdir / "compare" / "results.json"
    compared = _load(compare_file)
    runs = compare_runs(name)
    if compared is None or compared["checkpoint_step"] != args.steps or compared["num_samples"] != args.samples \
            or not set(runs) <= {entry["run"] for entry in compared["results"]}:
        times["compare_s"] = run_cli([*base, "--mode=compare", *RECIPE,
                                      "--config.compare.runs=(" + ",".join(f"'{run}'" for run in runs) + ",)",
                                      f"--config.compare.num_samples={args.samples}"], log)
        compared = _load(compare_file)
    times_file.write_text(json.dumps(times, indent=1) + "\n")

    samples = report["samples"]
    candidates = [{"run": f"{method}:{sampler_steps}", "nfe": samples["nfe"], "fid": samples["fid"],
                   "kid": samples["kid"], "kid_std": samples["kid_std"],
                   "confidence": samples["classifier"]["mean_confidence"], "seconds": samples["sampling_time_s"],
                   "candidate": True}]
    candidates += [{"run": entry["run"], "nfe": entry["nfe"], "fid": entry["fid"], "kid": entry["kid"],
                    "kid_std": entry["kid_std"], "confidence": entry["classifier"]["mean_confidence"],
                    "seconds": entry["sampling_time_s"], "candidate": entry["run"] in runs}
                   for entry in compared["results"]]
    return {"name": name, "config": config_file, "train_steps": summary["step"],
            "last_loss": summary["mean_loss_last_steps"], "times": times,
            "bpd_ode": report["bpd_ode"], "bpd_elbo": report["bpd_elbo"],
            "candidates": candidates, "grid": str(workdir / "eval" / f"samples_step{args.steps}.png")}


def best(candidates: list[dict], nfe: int) -> dict:
    """The candidate with the lowest FID among those within 10% of ``nfe`` evaluations. Only
    this benchmark's runs for the formulation compete (runs a workdir holds besides are shown,
    not chosen), so every formulation chooses among the same samplers."""
    near = [entry for entry in candidates if entry.get("candidate", True) and abs(entry["nfe"] - nfe) <= 0.1 * nfe]
    return min(near, key=lambda entry: entry["fid"])


def picture(rows: list[dict], path: Path) -> None:
    """The eval grids side by side, each titled with its formulation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows), 2.9), squeeze=False)
    for axis, row in zip(axes[0], rows):
        axis.imshow(mpimg.imread(row["grid"]), cmap="gray")
        axis.set_title(short_name(row["name"]), fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def noise_levels(name: str) -> dict[str, float]:
    """sigma/alpha of a formulation's SDE at the samplers' default smallest time and at the
    likelihood's: where its grids and its ELBO start, in noise level rather than time."""
    from sde.likelihood.common import DEFAULT_EPS as LIKELIHOOD_EPS
    from sde.samplers.spec import DEFAULT_EPS as SAMPLER_EPS
    from sde.sdes import create_sde

    sde = create_sde(load_config(FORMULATIONS[name][0]))
    level = {}
    for key, t in (("sampler_eps", SAMPLER_EPS), ("likelihood_eps", LIKELIHOOD_EPS)):
        time_ = torch.tensor([t], dtype=torch.float64)
        level[key] = (sde.sigma(time_) / sde.alpha(time_)).item()
    return level


def short_name(name: str) -> str:
    return FORMULATIONS[name][1].split(" (")[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps of every formulation")
    parser.add_argument("--samples", type=int, default=1000, help="samples per FID")
    parser.add_argument("--bpd-images", type=int, default=100, help="held-out digits for bits/dim")
    parser.add_argument("--workdir", default="runs/sde_comparison", help="where the four runs live")
    parser.add_argument("--only", nargs="+", choices=sorted(FORMULATIONS), default=list(FORMULATIONS),
                        help="formulations to run (default: all four)")
    add_write_options(parser)
    args = parser.parse_args()
    if args.steps < 1 or args.samples < 2 or args.bpd_images < 1:
        parser.error("--steps must be >= 1, --samples >= 2 and --bpd-images >= 1")

    rows = []
    for name in args.only:
        print(f"{name}: training, evaluating and comparing in {Path(args.workdir) / name}", flush=True)
        rows.append({**evaluate_formulation(name, args), "noise_level": noise_levels(name)})
    result = {"steps": args.steps, "batch_size": int(recipe_value("training.batch_size")), "samples": args.samples,
              "bpd_images": args.bpd_images, "recipe": list(RECIPE), "rows": rows}
    if not args.no_write:
        path = plot_path(args, NAME)
        picture(rows, path)
        result["figure"] = repo_relative(path)
    for row in rows:
        del row["grid"]  # a file of the workdir, not shipped: the picture holds it
    write_result(args, NAME, TITLE, result, render)
    return 0


def recipe_value(key: str) -> str:
    """The value ``RECIPE`` gives config key ``key``."""
    return next(flag.split("=", 1)[1] for flag in RECIPE if flag.startswith(f"--config.{key}="))


def render(result: dict) -> str:
    lines = [f"One U-Net (configs/mnist_quick.py's: base width 16, 280k parameters; the VE SDE with the Fourier time "
             f"embedding its config uses) trained {result['steps']:,} steps of batch {result['batch_size']} per "
             f"formulation with one recipe (`{' '.join(result['recipe'])}`), MNIST-10k. FID of {result['samples']:,} "
             f"samples against the training digits' Inception statistics; at 100 NFE the better of ancestral "
             f"sampling and (VE) predictor-corrector. Bits/dim of {result['bpd_images']} held-out digits (± standard "
             f"error): the ODE's with uniform dequantization; the ELBO is the continuous-time bound on uniformly "
             f"dequantized digits for the SDEs and Ho et al.'s discrete bound (eq. 5, discretized decoder) for DDPM. "
             f"Minutes: training; evaluation (bits/dim and the ancestral FID) and the other sampler runs.", ""]
    body = []
    for row in result["rows"]:
        few, many, times = best(row["candidates"], 10), best(row["candidates"], 100), row["times"]
        minutes = " + ".join(f"{times[key] / 60:.0f}" for key in ("train_s", "eval_s", "compare_s") if key in times)
        body.append([FORMULATIONS[row["name"]][1], minutes,
                     f"{few['fid']:.2f} ({few['run']})", f"{many['fid']:.2f} ({many['run']})",
                     f"{many['confidence']:.3f}",
                     f"{row['bpd_ode']['mean']:.3f} ± {row['bpd_ode']['standard_error']:.3f}",
                     f"{row['bpd_elbo']['mean']:.3f} ± {row['bpd_elbo']['standard_error']:.3f}"])
    lines.append(table(["formulation", "minutes", "FID at 10 NFE", "FID at 100 NFE", "confidence at 100",
                        "bits/dim ODE", "bits/dim ELBO"], body))
    runs = list(dict.fromkeys(entry["run"].removesuffix(":discrete=true")
                              for row in result["rows"] for entry in row["candidates"]))
    body = []
    for row in result["rows"]:
        fids = {entry["run"].removesuffix(":discrete=true"): f"{entry['fid']:.2f}" for entry in row["candidates"]}
        body.append([short_name(row["name"])] + [fids.get(run, "") for run in runs])
    lines += ["", "FID of every sampler run (the discrete model's on its own grid; runs only one formulation has are "
                  "shown, not chosen):", "",
              table(["formulation", *runs], body)]
    if result.get("figure"):
        lines += ["", f"![a grid of ancestral samples (100 steps) per formulation]({result['figure']})"]
    return "\n".join(lines) + "\n\n" + format_reading(reading(result))


def difference(rows: dict, first: str, second: str, key: str) -> tuple[float, float, bool]:
    """``first`` minus ``second`` in bits/dim ``key`` with its standard error, and whether it is
    paired: the evaluations share the held-out digits and their noise, so the per-image
    differences give the error; without per-image values, that of two independent means (larger)."""
    a, b = rows[first][key], rows[second][key]
    if "per_image" in a and "per_image" in b:
        mean, error = paired(torch.tensor(a["per_image"], dtype=torch.float64)
                             - torch.tensor(b["per_image"], dtype=torch.float64))
        return mean, error, True
    return a["mean"] - b["mean"], (a["standard_error"] ** 2 + b["standard_error"] ** 2) ** 0.5, False


def verdict(mean: float, error: float) -> str:
    """Whether a difference is told apart from zero (two standard errors), and its sign."""
    if abs(mean) < 2 * error:
        return "within two standard errors of zero"
    return "below zero" if mean < 0 else "above zero"


def reading(result: dict) -> list[str]:
    """The findings, from the numbers: the best formulation at each budget, and the likelihood
    ordering read against Song et al. 2021 (Table 2)."""
    rows = {row["name"]: row for row in result["rows"]}
    lines = []
    for nfe in (10, 100):
        ranked = sorted(rows, key=lambda name: best(rows[name]["candidates"], nfe)["fid"])
        first, last = best(rows[ranked[0]]["candidates"], nfe), best(rows[ranked[-1]]["candidates"], nfe)
        lines.append(f"At {nfe} NFE the lowest FID is {short_name(ranked[0])}'s ({first['fid']:.2f}, KID "
                     f"{first['kid']:.4f} ± {first['kid_std']:.4f}), the highest {short_name(ranked[-1])}'s "
                     f"({last['fid']:.2f}, KID {last['kid']:.4f} ± {last['kid_std']:.4f}).")
    if "vp" in rows and all("noise_level" in row for row in rows.values()):
        slow = [name for name in rows if best(rows[name]["candidates"], 10)["fid"]
                > 2 * best(rows["vp"]["candidates"], 10)["fid"]]
        vp_level = rows["vp"]["noise_level"]["sampler_eps"]
        shifted = [name for name in slow if not 1 / 3 < rows[name]["noise_level"]["sampler_eps"] / vp_level < 3]
        for name in shifted:
            lines.append(f"At 10 NFE {short_name(name)} falls far behind VP with the samplers' default smallest time "
                         f"t = 1e-3, where its noise level σ/α is {rows[name]['noise_level']['sampler_eps']:.1e} "
                         f"against VP's {vp_level:.1e}: a grid fixed in time is not one in noise level.")
        for name in slow:
            if name not in shifted:
                lines.append(f"{short_name(name)} falls far behind VP at 10 NFE too, at VP's noise level at "
                             f"t = 1e-3 ({rows[name]['noise_level']['sampler_eps']:.1e}); this run does not say why.")
    ranked = sorted(rows, key=lambda name: rows[name]["bpd_ode"]["mean"])
    lines.append("Bits/dim by the ODE, lowest first: " + ", ".join(
        f"{short_name(name)} {rows[name]['bpd_ode']['mean']:.3f}" for name in ranked) + "."
        + (" DDPM's network was trained at its 1,000 times only; the ODE asks it between them and below the "
           "first." if "ddpm" in rows else ""))
    if {"vp", "subvp"} <= rows.keys():
        mean, error, is_paired = difference(rows, "subvp", "vp", "bpd_ode")
        found = verdict(mean, error)
        agrees = {"below zero": "agrees with"}.get(found, "does not reproduce")
        lines.append(f"Song et al. 2021 (Table 2, CIFAR-10) find sub-VP's likelihood better than VP's (3.02 against "
                     f"3.16 bits/dim, same network). Here sub-VP minus VP is {mean:+.3f} ± {error:.3f} bits/dim by the "
                     f"ODE ({'paired by image' if is_paired else 'unpaired'}): {found}, which {agrees} the paper's "
                     f"ordering at this budget.")
    if {"ddpm", "vp"} <= rows.keys():
        mean, error, is_paired = difference(rows, "ddpm", "vp", "bpd_ode")
        few = {name: best(rows[name]["candidates"], 100)["fid"] for name in ("ddpm", "vp")}
        lines.append(f"Discrete DDPM against the continuous VP SDE (one diffusion, trained at 1,000 times or at all "
                     f"of [0, 1]): FID at 100 NFE {few['ddpm']:.2f} against {few['vp']:.2f}; ODE bits/dim DDPM "
                     f"minus VP {mean:+.3f} ± {error:.3f} ({verdict(mean, error)}). Their ELBOs are different "
                     f"bounds (discrete against continuous), so they are not compared.")
    if "subvp" in rows and "vp" in rows and "noise_level" in rows["subvp"]:
        elbo = rows["subvp"]["bpd_elbo"]
        lines.append(f"Sub-VP's ELBO ({elbo['mean']:.2f}) is its diffusion term ({elbo['diffusion']:.2f}) plus a "
                     f"reconstruction term of {elbo['reconstruction']:.2f}: the bound starts at t = 1e-5, where "
                     f"sub-VP's σ/α is {rows['subvp']['noise_level']['likelihood_eps']:.1e} against VP's "
                     f"{rows['vp']['noise_level']['likelihood_eps']:.1e}, so it integrates the network's error over "
                     f"noise levels it barely trained on. A valid bound, but a loose one; the ODE's figure is the "
                     f"one to compare.")
    if "ve" in rows:
        position = ranked.index("ve")
        where = "the lowest" if position == 0 else "the highest" if position == len(ranked) - 1 else "between"
        lines.append(f"The VE SDE's ODE bits/dim are {where} of the four; Song et "
                     f"al. report likelihoods for VP and sub-VP only, and sample VE with predictor-corrector "
                     f"(here `pc:50`, 100 NFE).")
    minutes = [row["times"]["train_s"] / 60 for row in result["rows"]]
    lines.append(f"Budget: {result['steps']:,} steps of batch {result['batch_size']} each, far below the papers'; "
                 f"the ordering of young networks can differ from that of converged ones. Training took "
                 f"{min(minutes):.0f} to {max(minutes):.0f} minutes: the same network and steps, so the spread is "
                 f"the machine's other load.")
    return lines


if __name__ == "__main__":
    sys.exit(main())
