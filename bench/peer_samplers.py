"""Our samplers against diffusers' schedulers on the same released weights: FID and KID at
10 and 20 NFE.

    python -m bench.peer_samplers --workdir runs/mnist_vp_release            # the protocol
    python -m bench.peer_samplers --num-samples 50 --reference-num-images 200 --no-write  # a quick try

The network of ``--checkpoint`` is sampled by

* ours: every registered sampler at its default options (``sde.samplers.available()``; the
  adaptive ``ode`` replaced by its fixed-step methods) and DPM-Solver of order 3, with
  ``steps_for_nfe``: the most steps whose evaluations fit the budget;
* theirs: diffusers' DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler,
  EulerDiscreteScheduler, and the stochastic DDPMScheduler and EulerAncestralDiscreteScheduler,
  each with every timestep spacing (leading, linspace, trailing) and, where offered, Karras
  sigmas, at as many steps as the budget (one evaluation per step), through the thin adapter
  of ``bench.peers``: schedulers built on our VP-SDE's DDPM chain (``trained_betas =
  sde.betas``, eps prediction), their integer timestep j mapped to our continuous time
  t = T (j + 1) / N, the convention of our ``discrete=True`` grids (discrete step i = j + 1 at
  t_i = T i / N, ``sde.sdes.SDE.discrete_times``). The Euler schedulers work on x / alpha,
  so their model input goes through ``scheduler.scale_model_input`` and their x_T is scaled
  by ``init_noise_sigma``, as diffusers' pipelines do.

Sample k starts from the same x_T everywhere (``sde.generation.sample_generators``: generator
(seed, k), which also gives the stochastic samplers' per-step noise of sample k); every run
counts its network evaluations. Before the runs, an adapter check samples two images with
diffusers' DDIM and DDPM (trailing spacing, 10 steps) and with our ``ddim``
(``discrete=True``) and ``ancestral`` on the identical discrete grid (uniform schedule down
to eps = the last timestep's t): each pair is the same algorithm on the same chain with the
same noise, so they must agree to float precision; a larger difference means the time
mapping or the tables are wrong, and the script stops.

FID and KID of ``--num-samples`` samples are taken against the Inception statistics of the
training images (``sde.quality.reference_features``, cached once per machine). The
section gives FID per sampler and budget and FID(our best) / FID(their best) per NFE budget,
over all samplers run and over the deterministic (probability-flow ODE) samplers of both
sides; the results go to ``bench/results/peer_samplers.json``. Finished runs are kept in
``--out``/runs.json, keyed by their settings (ours with every option that changes the
samples resolved), so an interrupted benchmark resumes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench import peers
from bench.common import (add_run_options, apply_threads, footnotes, format_reading, load_config, model_text,
                          network_digest,
                          repo_relative, table, write_result)
from bench.sampler_variants import sampler_variants, settings, variant_label
from sde import data, samplers
from sde.data import sample_shape
from sde.generation import sample_generators
from sde.inference import load_ema_model
from sde.quality import inception_for, reference_features, sample_quality
from sde.sdes import create_sde

NAME, TITLE = "peer_samplers", "Our samplers vs diffusers' schedulers on the same weights"
#: What the results file keeps of a run.
RUN_FIELDS = ("family", "label", "name", "options", "spacing", "karras", "budget", "steps", "nfe", "stochastic",
              "fid", "kid", "kid_std", "sampling_time_s")

#: Adapter check: diffusers scheduler and our sampler (with options) that are the same
#: algorithm on the same discrete chain (trailing spacing = our discrete uniform grid down
#: to the last timestep's t), and so must agree given the same x_T and per-step noise.
CHECK_PAIRS = (("DDIM", "ddim", {"discrete": True}), ("DDPM", "ancestral", {}))
#: Its images, steps, and the largest accepted |x_diffusers - x_ours| (the runs differ only
#: by float32 against float64 arithmetic, about 1e-5 on data in [-1, 1]).
CHECK_IMAGES, CHECK_STEPS, CHECK_TOLERANCE = 2, 10, 1e-3


def plan_ours(names: list[str], budgets: list[int]) -> list[dict]:
    """Our runs: sampler, options, steps for each NFE budget that the sampler fits in."""
    runs = []
    for budget in budgets:
        for name in names:
            for options in sampler_variants(name):
                try:
                    steps = samplers.steps_for_nfe(name, budget, **options)
                except ValueError:  # needs more than the budget even for one step
                    continue
                runs.append({"family": "ours", "budget": budget, "name": name, "options": options,
                             "steps": steps, "label": variant_label(name, options),
                             "stochastic": samplers.is_stochastic(name, **options)})
    return runs


def plan_theirs(names: list[str], spacings: list[str], karras: bool, budgets: list[int]) -> list[dict]:
    """diffusers runs: scheduler, spacing or Karras sigmas, steps = the NFE budget."""
    runs = []
    for budget in budgets:
        for name in names:
            settings = [(spacing, False) for spacing in spacings]
            if karras and name in peers.KARRAS_SCHEDULERS:
                settings.append(("linspace", True))  # the spacing is unused with Karras sigmas
            for spacing, use_karras in settings:
                runs.append({"family": "diffusers", "budget": budget, "name": name,
                             "spacing": spacing, "karras": use_karras, "steps": budget,
                             "label": peers.peer_label(name, spacing, use_karras),
                             "stochastic": name in peers.STOCHASTIC_SCHEDULERS})
    return runs


def peer_quality(config, model, sde, device, run: dict, *, num_samples: int, inception,
                 reference) -> dict:
    """FID/KID of ``num_samples`` images of a diffusers scheduler, streamed as
    ``sde.quality.sample_quality`` streams ours: same batches, seeds and feature sets."""
    from evaluation import compare_feature_sets
    from evaluation.fid import FeatureAccumulator

    scheduler = peers.make_scheduler(run["name"], sde, run["spacing"], run["karras"])
    features = FeatureAccumulator(num_samples, reference.stats.dim)
    batch_size, seed = config.sampling.batch_size, config.sampling.seed
    start, sampling_time, nfe = time.perf_counter(), 0.0, 0
    for first in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - first)
        batch_start = time.perf_counter()
        x, nfe = peers.peer_sample(scheduler, model, sde, sample_shape(config, count),
                                   steps=run["steps"], stochastic=run["stochastic"],
                                   generators=sample_generators(seed, first, count, device))
        sampling_time += time.perf_counter() - batch_start
        features.update(inception(data.float_to_uint8(x.float().cpu(),
                                                      dequantized=config.data.dequantize)), first)
    metrics = {"nfe": nfe, "num_samples": num_samples, "sampling_time_s": sampling_time,
               "wall_time_s": time.perf_counter() - start}
    metrics.update(compare_feature_sets(features.feature_set(), reference, seed=seed))
    return metrics


def adapter_check(config, model, sde, device) -> dict[str, float]:
    """max |x_diffusers - x_ours| of each ``CHECK_PAIRS`` pair on the same discrete grid."""
    differences = {}
    shape = sample_shape(config, CHECK_IMAGES)
    for their_name, our_name, our_options in CHECK_PAIRS:
        scheduler = peers.make_scheduler(their_name, sde, "trailing")
        scheduler.set_timesteps(CHECK_STEPS)
        their_t = peers.time_of_timestep(scheduler.timesteps, sde)
        theirs, _ = peers.peer_sample(scheduler, model, sde, shape, steps=CHECK_STEPS,
                                      stochastic=their_name in peers.STOCHASTIC_SCHEDULERS,
                                      generators=sample_generators(0, 0, CHECK_IMAGES, device))
        ours, info = samplers.sample(our_name, model, sde, shape, steps=CHECK_STEPS,
                                     schedule="uniform", eps=float(their_t[-1]), disable=True,
                                     generator=sample_generators(0, 0, CHECK_IMAGES, device),
                                     **our_options)
        if not torch.allclose(torch.tensor(info["t"][:-1], dtype=torch.float64), their_t):
            raise SystemExit(f"adapter check: {our_name} grid {info['t'][:-1]} differs from "
                             f"{their_name}'s {their_t.tolist()}")
        differences[f"{their_name} vs {our_name}"] = float((theirs.double() - ours.double()).abs().max())
    return differences


def summarize(runs: list[dict], budgets: list[int], *, defaults_only: bool = False) -> list[dict]:
    """Best of each family per NFE budget, over all samplers and over the deterministic ones
    (``defaults_only``: ours with default options only), and the ratio ours / diffusers."""
    rows = []
    for budget in budgets:
        for scope in ("all", "deterministic"):
            best = {}
            for family in ("ours", "diffusers"):
                candidates = [run for run in runs if run["budget"] == budget and run["family"] == family
                              and (scope == "all" or not run["stochastic"])
                              and not (defaults_only and family == "ours" and run.get("options"))]
                if candidates:
                    best[family] = min(candidates, key=lambda run: run["fid"])
            if len(best) == 2:
                rows.append({"budget": budget, "scope": scope, "ours": best["ours"], "diffusers": best["diffusers"],
                             "ratio": best["ours"]["fid"] / best["diffusers"]["fid"]})
    return rows


def _pivot(runs: list[dict], budgets: list[int]) -> str:
    """FID per sampler (rows) and NFE budget (columns), ours first, each family by its FID."""
    cells: dict[tuple[str, str], dict[int, float]] = {}
    for run in runs:
        cells.setdefault((run["family"], run["label"]), {})[run["budget"]] = run["fid"]
    order = sorted(cells, key=lambda key: (key[0] != "ours", [cells[key].get(b, 1e9) for b in budgets]))
    return table(["family", "sampler"] + [f"{budget} NFE" for budget in budgets],
                 [[family, label] + [f"{cells[(family, label)][b]:.2f}" if b in cells[(family, label)] else ""
                                     for b in budgets] for family, label in order])


def _summary_table(summary: list[dict]) -> str:
    return table(["NFE", "samplers", "our best", "FID", "diffusers' best", "FID", "ours / diffusers"],
                 [[row["budget"], row["scope"], row["ours"]["label"], f"{row['ours']['fid']:.2f}",
                   row["diffusers"]["label"], f"{row['diffusers']['fid']:.2f}", f"{row['ratio']:.3f}"]
                  for row in summary])


def _seed_table(result: dict, supplement: dict, headline: dict) -> tuple[str, str]:
    """FID of the headline pair's samplers (and any other label run at every seed) per seed,
    with the main run's seed, and the ratio of the headline pair; and its reading."""
    runs = [{**run, "seed": result["seed"]} for run in result["runs"] if run["budget"] == headline["budget"]]
    runs += [run for run in supplement["runs"] if run["budget"] == headline["budget"]]
    seeds = sorted({run["seed"] for run in supplement["runs"]} | {result["seed"]})
    fid = {(run["family"], run["label"], run["seed"]): run["fid"] for run in runs}
    labels = sorted({(run["family"], run["label"]) for run in supplement["runs"]},
                    key=lambda key: (key[0] != "ours", key[1]))
    rows, means = [], {}
    for family, label in labels:
        values = [fid.get((family, label, seed)) for seed in seeds]
        if None in values:
            continue
        means[(family, label)] = sum(values) / len(values)
        rows.append([f"{family}: {label}"] + [f"{v:.2f}" for v in values] + [f"{means[(family, label)]:.2f}"])
    ours, theirs = ("ours", headline["ours"]["label"]), ("diffusers", headline["diffusers"]["label"])
    ratios = [fid[(*ours, seed)] / fid[(*theirs, seed)] for seed in seeds]
    mean_ratio = means[ours] / means[theirs]
    rows.append([f"ratio, ours / theirs (the best at seed {result['seed']})"] + [f"{r:.3f}" for r in ratios]
                 + [f"{mean_ratio:.3f}"])
    text = table(["FID at " + str(headline["budget"]) + " NFE, sampling seed"] + [str(s) for s in seeds]
                 + ["mean"], rows)
    reading = (f"Over sampling seeds {seeds[0]}-{seeds[-1]} the ratio of the two best at seed "
               f"{result['seed']}, `{ours[1]}` / `{theirs[1]}`, runs from {min(ratios):.3f} to {max(ratios):.3f}, {mean_ratio:.3f} on "
               f"the mean FIDs (the options of ours were picked at seed {result['seed']}, so the "
               "other seeds are held out).")
    return text, reading


def render(result: dict) -> str:
    budgets = result["nfe_budgets"]
    check = ", ".join(f"{pair} {difference:.1e}" for pair, difference in result["adapter_check"].items())
    summary = summarize(result["runs"], budgets)
    parts = [f"{model_text(result['model'])}; {result['num_samples']:,} samples per run, seed "
             f"{result['seed']} (the same x_T per image in every run); FID against the Inception "
             f"statistics of {result['reference_images']:,} training images.", "",
             _pivot(result["runs"], budgets), "", _summary_table(summary)]
    reading = []
    defaults = {(row["budget"], row["scope"]): row for row in summarize(result["runs"], budgets, defaults_only=True)}
    for budget in budgets:
        rows = {row["scope"]: row for row in summary if row["budget"] == budget}
        if not rows:
            continue
        text = f"At {budget} NFE our best is " + " and ".join(
            f"{row['ratio']:.3f}x diffusers' best over {'all' if scope == 'all' else 'the deterministic'} samplers"
            for scope, row in rows.items())
        plain = [defaults[(budget, scope)] for scope in rows if (budget, scope) in defaults]
        if any(row["ours"] is not rows[row["scope"]]["ours"] for row in plain):
            text += "; with our default options only, " + " and ".join(
                f"{row['ratio']:.3f}x (`{row['ours']['label']}`, {row['ours']['fid']:.2f})" for row in plain)
        reading.append(text + ".")
    reading.append(f"Adapter check (the same algorithm on the same discrete grid, ours against diffusers'): {check}"
                   + (": float32 rounding." if max(result["adapter_check"].values()) < 1e-4 else "."))
    headline = next((row for row in summary if row["scope"] == "all"), None)
    supplements = result.get("supplements", [])
    markers, notes = footnotes(supplements)
    for supplement, marker in zip(supplements, markers):
        if supplement.get("seeds") and headline:
            text, line = _seed_table(result, supplement, headline)
            parts += ["", f"The runs of the headline comparison at other sampling seeds{marker}:", "", text]
            reading.append(line)
            continue
        budgets_ = sorted({run["budget"] for run in supplement["runs"]})
        for row in summarize(supplement["runs"], budgets_):
            if row["scope"] == "all":
                reading.append(f"At {supplement['num_samples']:,} samples{marker}, {row['budget']} NFE: "
                               f"`{row['ours']['label']}` {row['ours']['fid']:.2f} against "
                               f"`{row['diffusers']['label']}` {row['diffusers']['fid']:.2f}, {row['ratio']:.3f}x "
                               "(FID's upward bias shrinks with the sample count and is shared by both).")
    if notes:
        parts += [""] + notes
    reading.append("diffusers' SDE solver runs at its default order 2: its third order does not converge "
                   "(investigation below).")
    return "\n".join(parts) + "\n\n" + format_reading(reading)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_vp_release.py")
    parser.add_argument("--checkpoint", default="release/mnist_vp_release.safetensors",
                        help="exported .safetensors weights or a training checkpoint .pt")
    parser.add_argument("--workdir", default="runs/mnist_vp_release",
                        help="run directory of the weights when --checkpoint is not a file of its own")
    parser.add_argument("--out", default="bench/results/peer_samplers")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--seed", type=int, default=0, help="image k starts from generator (seed, k)")
    parser.add_argument("--ours", nargs="+", default=None, help="our samplers (default: all registered)")
    parser.add_argument("--schedulers", nargs="+", default=list(peers.SCHEDULERS),
                        choices=list(peers.SCHEDULERS))
    parser.add_argument("--spacings", nargs="+", default=list(peers.SPACINGS), choices=list(peers.SPACINGS))
    parser.add_argument("--no-karras", action="store_true", help="skip the Karras-sigma variants")
    parser.add_argument("--reference-num-images", type=int, default=0,
                        help="training images in the FID reference (0: all, the protocol)")
    parser.add_argument("--only", nargs="+", default=None, metavar="LABEL",
                        help="run only the planned runs with these labels, as the table prints them, "
                             "e.g. 'dpm_solver_sde (eps=0.02, schedule=karras)'")
    add_run_options(parser)
    args = parser.parse_args()
    names = args.ours or samplers.available()
    unknown = sorted(set(names) - set(samplers.available()))
    if unknown:
        parser.error(f"unknown sampler(s) {unknown}; accepted: {', '.join(samplers.available())}")
    if args.num_samples < 2:
        parser.error("--num-samples must be >= 2 (FID needs a covariance)")
    if not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint {args.checkpoint} does not exist")
    runs = plan_ours(names, args.nfe) + plan_theirs(args.schedulers, args.spacings,
                                                    not args.no_karras, args.nfe)
    if args.only:
        labels = {run["label"] for run in runs}
        missing = sorted(set(args.only) - labels)
        if missing:
            parser.error(f"--only: no planned run is labelled {missing}; planned: {sorted(labels)}")
        runs = [run for run in runs if run["label"] in args.only]
    peers.require_diffusers()
    apply_threads(args)

    config = load_config(args.config)
    config.sampling.batch_size = args.batch_size
    config.sampling.seed = args.seed
    config.eval.reference_num_images = args.reference_num_images
    device = torch.device("cpu")
    sde = create_sde(config)
    model, source, step = load_ema_model(config, args.workdir, device, args.checkpoint)
    differences = adapter_check(config, model, sde, device)
    check = ", ".join(f"{pair} {difference:.1e}" for pair, difference in differences.items())
    print(f"adapter check, max |x_diffusers - x_ours| on the same discrete grid of {CHECK_STEPS} "
          f"steps: {check}", flush=True)
    if max(differences.values()) > CHECK_TOLERANCE:
        raise SystemExit(f"adapter check failed: a difference above {CHECK_TOLERANCE}; the "
                         f"timestep mapping or the beta tables do not match")
    inception = inception_for(config, device)
    reference = reference_features(config, inception)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store_path = out / "runs.json"
    store = json.loads(store_path.read_text()) if store_path.is_file() else {}
    weights_digest = network_digest(model)

    results = []
    for run in runs:
        key = (f"{weights_digest}|{args.num_samples}|{reference.count}|{args.seed}|"
               f"{run['family']}|{run['label']}|{run['steps']}")
        if run["family"] == "ours":  # defaults filled in: a changed default is a new run
            key += "|" + settings(run["name"], run["options"], sde)
        if key not in store:
            if run["family"] == "ours":
                metrics, _ = sample_quality(config, model, sde, device, method=run["name"],
                                            steps=run["steps"], options=run["options"],
                                            num_samples=args.num_samples, inception=inception,
                                            reference=reference, progress=False)
                metrics = {key_: metrics[key_] for key_ in ("nfe", "num_samples", "sampling_time_s",
                                                            "wall_time_s", "fid", "kid", "kid_std",
                                                            "num_generated", "num_reference")}
            else:
                metrics = peer_quality(config, model, sde, device, run,
                                       num_samples=args.num_samples, inception=inception,
                                       reference=reference)
            store[key] = {**run, **metrics}
            store_path.write_text(json.dumps(store, indent=1, default=str))
        metrics = {**store[key], **run}
        print(f"{metrics['family']} {metrics['label']} x{metrics['steps']}: NFE {metrics['nfe']}, "
              f"FID {metrics['fid']:.2f}, {metrics['wall_time_s']:.0f} s", flush=True)
        results.append({key_: metrics[key_] for key_ in RUN_FIELDS if key_ in metrics})

    result = {"model": {"checkpoint": repo_relative(source), "step": step, "weights_digest": weights_digest},
              "num_samples": args.num_samples, "seed": args.seed, "reference_images": reference.count,
              "nfe_budgets": sorted(args.nfe), "adapter_check": differences,
              "runs": sorted(results, key=lambda m: (m["budget"], m["family"] != "ours", m["fid"]))}
    write_result(args, NAME, TITLE, result, render)


if __name__ == "__main__":
    main()
