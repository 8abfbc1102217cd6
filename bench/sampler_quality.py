"""Every sampler on the released model at a ladder of NFE: FID, KID, classifier metrics.

    python -m bench.sampler_quality                      # the full protocol (hours on 2 CPU cores)
    python -m bench.sampler_quality --num-samples 300 --long-steps 0   # a cheaper subset
    python -m bench.sampler_quality --samplers dpm_solver_sde --nfe 10 --long-steps 0 \
        --runs dpm_solver_sde:10:eta=0.5                 # a rung plus a variant beside it
    python -m bench.sampler_quality --samplers dpm_solver_sde --nfe 10 --long-steps 0 \
        --seed 5 --no-write     # a held-out sampling seed, to fit options on (runs stored, results untouched)

The protocol on MNIST-10k (trained on the MNIST test split, held out on train5k): each
fixed-step sampler at 10, 20, 50 and 100 network evaluations per sample (``steps_for_nfe``:
the most steps that fit), ancestral and DDIM (``--long-samplers``) also at ``--long-steps``
(1000) steps, the adaptive dopri5 ODE at its natural NFE; the same per-sample seeds
everywhere; ``--num-samples`` images each, streamed through Inception into FID/KID against
the statistics of the 10k training images, and through the MNIST classifier (mean
confidence, class histogram). Beside them, the *floor*: the same metrics for
``--num-samples`` real held-out images (train5k), i.e. what a perfect sampler would score
at that sample count. ``--runs`` adds runs with explicit options (``--mode compare``'s
'method:steps:key=value' syntax) to the same table. Writes ``bench/results/sampler_quality.json``
and the FID-vs-NFE plot of every run measured on these weights
(``bench/results/sampler_quality.png``).

Each finished run is stored in ``--out/runs.json`` keyed by its settings (the sampler's
own options and eps, denoise, clip_x0 and schedule, with their defaults resolved), so an
interrupted benchmark resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from bench.common import (add_run_options, apply_threads, footnotes, format_reading, load_config, model_text,
                          network_digest,
                          plot_path, repo_relative, table, write_result)
from bench.sampler_variants import settings
from sde import data, samplers
from sde.images import fid_vs_nfe_plot
from sde.inference import load_ema_model
from sde.quality import classifier_metrics_for, inception_for, reference_features, sample_quality
from sde.samplers import parse_run
from sde.sdes import create_sde

NAME, TITLE = "sampler_quality", "Sampler quality on the released model"
#: Samplers with a fixed evaluation budget, and the adaptive one run at its own NFE.
ADAPTIVE = "ode"
#: Samplers also run at ``--long-steps`` (the protocol's 1000-step references).
LONG_SAMPLERS = ("ancestral", "ddim")


def plan_runs(names: list[str], nfes: list[int], long_steps: int,
              long_samplers: tuple[str, ...] = LONG_SAMPLERS) -> list[tuple[str, int, dict]]:
    """(sampler, steps, options) for every run of the protocol, cheapest rung first: every
    sampler at the smallest NFE, then every sampler at the next, ..., then the adaptive ODE and
    the long runs. An interrupted benchmark thus leaves whole rungs of the ladder behind."""
    runs = []
    for nfe in sorted(nfes):
        for name in names:
            if name == ADAPTIVE:
                continue
            try:
                runs.append((name, samplers.steps_for_nfe(name, nfe), {}))
            except ValueError:  # the sampler needs more than nfe evaluations even for 1 step
                continue
    if ADAPTIVE in names:
        runs.append((ADAPTIVE, 2, {}))  # dopri5: steps only bound the interval, NFE is adaptive
    if long_steps:
        runs += [(name, long_steps, {}) for name in long_samplers if name in names]
    return runs


def _label(name: str, steps: int, options: dict) -> str:
    return f"{name}:{steps}" + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")


def real_floor(config, heldout_split: str, count: int, inception, reference, seed: int, device) -> dict:
    """FID/KID/classifier metrics of ``count`` real held-out images against the reference."""
    from evaluation import FeatureSet, compare_feature_sets

    heldout, _ = data.evaluation_subset(*data.load_dataset(config, split=heldout_split), count,
                                        seed=config.seed)
    features, classifier = FeatureSet.empty(), classifier_metrics_for(config, device)
    for start in range(0, len(heldout), config.eval.batch_size):
        batch = heldout[start:start + config.eval.batch_size]
        features.update(inception(batch))
        if classifier is not None:
            classifier.update(batch)
    metrics = compare_feature_sets(features, reference, seed=seed)
    metrics.update({"run": f"real {heldout_split} images", "sampler": "real data", "steps": 0,
                    "nfe": 0, "num_samples": len(heldout), "wall_time_s": 0.0})
    if classifier is not None:
        metrics["classifier"] = classifier.result()
    return metrics


def measured_ladder(store: dict, prefix: str, sde) -> list[dict]:
    """Every run in ``store`` whose key starts with ``prefix`` (same weights, sample count,
    reference and seed) and was made with the sampler's current option defaults, as plot rows:
    the plot shows all that has been measured on these weights, not only this invocation's
    rungs. A run with explicit options is its own series, e.g. ``pc (predictor=...)``."""
    rows = []
    for key, metrics in store.items():
        if not key.startswith(prefix):
            continue
        label, stored_settings = key[len(prefix):].split("|", 1)
        name, _steps, *option_text = label.split(":", 2)
        if name not in samplers.SAMPLERS:
            continue  # a sampler since removed
        if not option_text and stored_settings != settings(name, {}, sde):
            continue  # made with defaults that have changed since
        # a schedule file is named by its file name alone, so that the legend stays readable
        shown = re.sub(r"schedule=[^,]*/", "schedule=", option_text[0]) if option_text else ""
        series = f"{name} ({shown})" if option_text else name
        rows.append({"sampler": series, "nfe": metrics["nfe"], "fid": metrics["fid"]})
    return rows


def run_row(metrics: dict, *, label: str, name: str, steps: int, options: dict,
            run_settings: dict | None) -> dict:
    """The results-file row of one run (or of the floor) from its stored metrics."""
    classifier = metrics.get("classifier", {})
    histogram = classifier.get("class_histogram", [])
    row = {"run": label, "sampler": name, "steps": steps, "options": options, "nfe": metrics["nfe"],
           "fid": metrics["fid"], "kid": metrics["kid"], "kid_std": metrics["kid_std"],
           "confidence": classifier.get("mean_confidence"),
           "histogram_tv": classifier.get("histogram_tv_from_uniform"),
           "classes_seen": sum(1 for share in histogram if share > 0) if histogram else None,
           "wall_time_s": metrics["wall_time_s"]}
    if run_settings is not None:
        row["stochastic"] = samplers.is_stochastic(name, **options)
        row["settings"] = run_settings
    return row


# ---- the section -------------------------------------------------------------------------

def _column(run: dict, result: dict) -> str:
    """The ladder column of a run: its NFE budget, the long runs, or the adaptive ODE."""
    if run["sampler"] == ADAPTIVE and "method" not in run["options"]:
        return "adaptive"
    budgets = sorted(result["nfe_budgets"])
    if run["steps"] == result["long_steps"] and run["nfe"] > budgets[-1]:
        return f"{result['long_steps']:,} steps"
    fits = [budget for budget in budgets if run["nfe"] <= budget]
    return f"{min(fits) if fits else run['nfe']} NFE"


def _series(run: dict) -> str:
    """A row of the section's table: the sampler, and its explicit options as the run gave them
    (a schedule file by its name)."""
    options = run["run"].split(":", 2)[2] if run["run"].count(":") >= 2 else ""
    options = re.sub(r"schedule=[^,]*/", "schedule=", options).replace(",", ", ")
    return f"`{run['sampler']}`" + (f" ({options})" if options else "")


def _fitted_schedule_reading(supplement: dict, runs: list[dict]) -> str:
    """How runs on fitted (explicit) schedules compare with the same sampler on its own."""
    pairs = []
    for run in supplement["runs"]:
        if not isinstance(run["settings"].get("schedule"), list):
            continue
        same = {key: value for key, value in run["settings"].items() if key != "schedule"}
        for base in runs:
            base_same = {key: value for key, value in base["settings"].items() if key != "schedule"}
            if (base["sampler"] == run["sampler"] and base["nfe"] == run["nfe"] and base_same == same
                    and isinstance(base["settings"]["schedule"], str)):
                pairs.append(f"`{run['sampler']}` (eps {same['eps']:g}, {base['settings']['schedule']} "
                             f"levels) {base['fid']:.2f} → {run['fid']:.2f}")
                break
    bounds = [f"{fit['bound_initial']:.0f} → {fit['bound_fitted']:.0f} (eps {fit['eps']:g})"
              for fit in supplement.get("fitted_schedules", [])]
    text = ("Schedules fitted by Align Your Steps (`--mode align_steps`; the files beside the run "
            "store) lower the KL bound they optimise")
    text += f", {', '.join(bounds)}," if bounds else ""
    text += " but raise FID at the same NFE: " + "; ".join(pairs) + "." if pairs else "."
    return text + (" The bound weighs a step's error by s⁻³ in the noise level s = σ/α, so the fit "
                   "crowds the levels toward the low-noise end, where FID does not look; the named "
                   "schedules stay the defaults.")


def render(result: dict) -> str:
    runs = result["runs"]
    supplements = result.get("supplements", [])
    extra = [run for supplement in supplements for run in supplement["runs"]]
    floor = result["floor"]
    markers, notes = footnotes(supplements)
    marked = [(run, "") for run in runs] + [(run, marker) for supplement, marker in zip(supplements, markers)
                                             for run in supplement["runs"]]
    budgets = [f"{budget} NFE" for budget in sorted(result["nfe_budgets"])]
    present = {_column(run, result) for run, _ in marked}
    columns = [c for c in budgets if c in present] + sorted(present - set(budgets), key=lambda c: c == "adaptive")
    cells: dict[str, dict[str, str]] = {}
    for run, marker in sorted(marked, key=lambda item: (bool(item[0]["options"]), item[0]["sampler"])):
        column = _column(run, result)
        cell = f"{run['fid']:.2f}"
        if column == "adaptive" or (column.endswith("NFE") and f"{run['nfe']} NFE" != column):
            cell += f" ({run['nfe']})"
        cells.setdefault(_series(run) + marker, {})[column] = cell
    parts = [f"{model_text(result['model'])}; {result['num_samples']:,} samples per run, seed {result['seed']} "
             f"(the same per-sample seeds in every run), FID against the Inception statistics of "
             f"{result['reference_images']:,} training images; the floor, {result['num_samples']:,} real train5k "
             f"images, scores {floor['fid']:.2f}. FID per sampler and NFE budget (the NFE in brackets where it "
             "differs), default options first, then runs with explicit options:", "",
             table(["sampler"] + columns, [[series] + [row.get(c, "") for c in columns]
                                           for series, row in cells.items()])]
    if notes:
        parts += [""] + notes
    if result.get("plot"):
        parts += ["", f"![FID against NFE, every run on these weights](bench/results/{result['plot']})"]

    reading = []
    everything = runs + extra
    long_ancestral = next((run for run in runs if run["run"] == f"ancestral:{result['long_steps']}"), None)
    at_10 = [run for run in everything if run["nfe"] <= 10]
    if at_10 and long_ancestral:
        best = min(at_10, key=lambda run: run["fid"])
        text = (f"At 10 NFE the best run is `{best['run']}`, FID {best['fid']:.2f}, "
                f"{best['fid'] / long_ancestral['fid']:.2f}x ancestral sampling at {result['long_steps']:,} "
                f"steps ({long_ancestral['fid']:.2f})")
        default_10 = [run for run in at_10 if not run["options"]]
        if default_10:
            best_default = min(default_10, key=lambda run: run["fid"])
            text += (f"; with default options `{best_default['run']}`, {best_default['fid']:.2f} "
                     f"({best_default['fid'] / long_ancestral['fid']:.2f}x)")
        reading.append(text + ". Options were picked on this table's seed, so the defaults stay.")
    converged = [run for run in runs if not run["options"] and run["nfe"] >= 100 and "stochastic" in run]
    stochastic = sorted(run["fid"] for run in converged if run["stochastic"])
    deterministic = sorted(run["fid"] for run in converged if not run["stochastic"])
    if stochastic and deterministic:
        text = (f"From 100 NFE on, the stochastic samplers reach FID {stochastic[0]:.2f}-{stochastic[-1]:.2f} "
                f"and the probability-flow ODE samplers {deterministic[0]:.2f}-{deterministic[-1]:.2f}")
        spread = deterministic[-1] / deterministic[0] - 1
        if spread < 0.1 and deterministic[0] > stochastic[-1]:
            text += (f". The ODE solvers agree within {100 * spread:.0f} %, so their limit is this network's "
                     "probability-flow ODE, not a solver's error; the noise that the stochastic samplers "
                     "inject corrects it")
        reading.append(text + ".")
    best = min(everything, key=lambda run: run["fid"])
    reading.append(f"Best run: `{best['run']}` at {best['nfe']} NFE, FID {best['fid']:.2f} = "
                   f"{best['fid'] / floor['fid']:.2f}x the real-data floor.")
    for supplement in result.get("supplements", []):
        if any(isinstance(run.get("settings", {}).get("schedule"), list) for run in supplement["runs"]):
            reading.append(_fitted_schedule_reading(supplement, runs))
    return "\n".join(parts) + "\n\n" + format_reading(reading)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_vp_release.py")
    parser.add_argument("--checkpoint", default="release/mnist_vp_release.safetensors")
    parser.add_argument("--workdir", default="runs/mnist_vp_release",
                        help="run directory of the weights when --checkpoint is not a file of its own")
    parser.add_argument("--out", default="bench/results/sampler_quality", help="where the run store goes")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--long-steps", type=int, default=1000,
                        help="steps of the long runs (0: skip them)")
    parser.add_argument("--long-samplers", nargs="+", default=list(LONG_SAMPLERS),
                        help="samplers run at --long-steps (default: ancestral ddim)")
    parser.add_argument("--samplers", nargs="+", default=None, help="default: every registered sampler")
    parser.add_argument("--runs", nargs="+", default=[], metavar="METHOD:STEPS[:KEY=VALUE,...]",
                        help="extra runs with explicit options, e.g. dpm_solver_sde:10:eta=0.5")
    parser.add_argument("--seed", type=int, default=None,
                        help="sampling seed (default: the config's sampling.seed, the protocol's)")
    parser.add_argument("--reference-num-images", type=int, default=0,
                        help="training images in the FID reference (0: all 10k, the protocol)")
    add_run_options(parser)
    args = parser.parse_args()
    names = args.samplers or samplers.available()
    unknown = sorted((set(names) | set(args.long_samplers)) - set(samplers.available()))
    if unknown:
        parser.error(f"unknown sampler(s) {unknown}; accepted: {', '.join(samplers.available())}")
    if args.num_samples < 2:
        parser.error("--num-samples must be >= 2 (FID needs a covariance)")
    if args.seed is not None and not 0 <= args.seed < 2 ** 63:
        parser.error(f"--seed must lie in [0, 2^63), got {args.seed}")
    if not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint {args.checkpoint} does not exist")
    apply_threads(args)

    config = load_config(args.config)
    config.sampling.batch_size = args.batch_size
    config.eval.reference_num_images = args.reference_num_images
    protocol_seed = config.sampling.seed
    if args.seed is not None:
        config.sampling.seed = args.seed
    device = torch.device("cpu")
    sde = create_sde(config)
    extra_runs = []
    for entry in args.runs:
        try:
            name, steps, options = parse_run(entry)
            samplers.nfe_for_steps(name, steps, **options)  # unknown sampler or option, bad steps
            samplers.resolve_options(name, sde, options, steps)
        except ValueError as error:
            parser.error(f"--runs {entry!r}: {error}")
        extra_runs.append((name, steps, options))
    model, source, step = load_ema_model(config, args.workdir, device, args.checkpoint)
    inception = inception_for(config, device)
    reference = reference_features(config, inception)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store_path = out / "runs.json"
    store = json.loads(store_path.read_text()) if store_path.is_file() else {}
    weights_digest = network_digest(model)

    def cached(key: str, compute) -> dict:
        if key not in store:
            store[key] = compute()
            on_disk = json.loads(store_path.read_text()) if store_path.is_file() else {}
            store.update({**on_disk, key: store[key]})  # keep runs another process stored
            store_path.write_text(json.dumps(store, indent=1, default=str))
        return store[key]

    # the floor's KID subsets follow the seed: another seed's floor is stored apart
    floor_seed = "" if config.sampling.seed == protocol_seed else f"|seed {config.sampling.seed}"
    floor = cached(f"floor|{args.num_samples}|{config.eval.heldout_split}|{reference.count}{floor_seed}",
                   lambda: real_floor(config, config.eval.heldout_split, args.num_samples,
                                      inception, reference, config.sampling.seed, device))
    prefix = f"{weights_digest}|{args.num_samples}|{reference.count}|{config.sampling.seed}|"
    rows = []
    plan = plan_runs(names, args.nfe, args.long_steps, tuple(args.long_samplers)) + extra_runs
    for name, steps, options in plan:
        label = _label(name, steps, options)
        run_settings = settings(name, options, sde)

        def run(name=name, steps=steps, options=options, label=label) -> dict:
            metrics, _ = sample_quality(config, model, sde, device, method=name, steps=steps,
                                        options=options, num_samples=args.num_samples,
                                        inception=inception, reference=reference,
                                        classifier=classifier_metrics_for(config, device))
            metrics["run"] = label
            return metrics

        metrics = cached(f"{prefix}{label}|{run_settings}", run)
        print(f"{label}: NFE {metrics['nfe']}, FID {metrics['fid']:.2f}, {metrics['wall_time_s']:.0f} s",
              flush=True)
        rows.append(run_row(metrics, label=label, name=name, steps=steps, options=options,
                            run_settings=json.loads(run_settings)))

    plot = plot_path(args, NAME)
    if not args.no_write:  # the plot belongs to the results file: --no-write leaves both alone
        fid_vs_nfe_plot(measured_ladder(store, prefix, sde), plot)
    result = {"model": {"checkpoint": repo_relative(source), "step": step, "weights_digest": weights_digest},
              "num_samples": args.num_samples, "seed": config.sampling.seed,
              "reference_images": reference.count, "nfe_budgets": sorted(args.nfe),
              "long_steps": args.long_steps,
              "floor": run_row(floor, label=floor["run"], name="real data", steps=0, options={},
                               run_settings=None),
              "runs": sorted(rows, key=lambda row: (row["sampler"], row["nfe"])), "plot": plot.name}
    write_result(args, NAME, TITLE, result, render)


if __name__ == "__main__":
    main()
