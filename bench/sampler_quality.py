"""Every sampler on the released model at a ladder of NFE: FID, KID, classifier metrics, time.

    python bench/sampler_quality.py                      # the full protocol (hours on 2 CPU cores)
    python bench/sampler_quality.py --num-samples 300 --long-steps 0   # a cheaper subset
    python bench/sampler_quality.py --samplers dpm_solver_sde --nfe 10 --long-steps 0 \
        --runs dpm_solver_sde:10:eta=2.0                 # a rung plus a variant beside it

The protocol of issue 6 on MNIST-10k (../shared/DESIGN.md): each fixed-step sampler at
10, 20, 50 and 100 network evaluations per sample (``steps_for_nfe``: the most steps that
fit), ancestral and DDIM (``--long-samplers``) also at ``--long-steps`` (1000) steps, the
adaptive dopri5 ODE at its natural NFE; the same per-sample seeds everywhere;
``--num-samples`` images each, streamed through Inception into FID/KID against the
statistics of the 10k training images, and through the MNIST classifier (mean confidence,
class histogram). Beside them, the *floor*: the same metrics for ``--num-samples`` real
held-out images (train5k), i.e. what a perfect sampler would score at that sample count.
``--runs`` adds runs with explicit options (``--mode compare``'s 'method:steps:key=value'
syntax) to the same table; they count for the best at 10 NFE like any rung. Prints the table and the ratio
FID(best sampler at 10 NFE) / FID(ancestral, 1000 steps) (goal <= 1.15), writes the
FID-vs-NFE plot of every run measured on these weights (``fid_vs_nfe_<weights digest>.png``),
and appends the table to BENCHMARKS.md.

Each finished run is stored in ``--out/runs.json`` keyed by its settings (the sampler's
own options and eps, denoise, clip_x0 and schedule, with their defaults resolved), so an
interrupted benchmark resumes where it stopped.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import add_run_options, apply_threads, load_config, publish  # noqa: E402
from bench.sampler_variants import settings  # noqa: E402
from sde import data, samplers  # noqa: E402
from sde.inference import load_ema_model  # noqa: E402
from sde.images import fid_vs_nfe_plot  # noqa: E402
from sde.samplers import parse_run  # noqa: E402
from sde.quality import reference_features, sample_quality  # noqa: E402
from sde.sdes import create_sde  # noqa: E402
from sde.workdir import Workdir  # noqa: E402

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


def real_floor(config, heldout_split: str, count: int, inception, reference, seed: int) -> dict:
    """FID/KID/classifier metrics of ``count`` real held-out images against the reference."""
    from evaluation import ClassifierMetrics, FeatureSet, compare_feature_sets

    heldout, _ = data.evaluation_subset(*data.load_dataset(config, split=heldout_split), count,
                                        seed=config.seed)
    features, classifier = FeatureSet.empty(), ClassifierMetrics()
    for start in range(0, len(heldout), config.eval.batch_size):
        batch = heldout[start:start + config.eval.batch_size]
        features.update(inception(batch))
        classifier.update(batch)
    metrics = compare_feature_sets(features, reference, seed=seed)
    metrics.update({"run": f"real {heldout_split} images", "sampler": "real data", "steps": 0,
                    "nfe": 0, "num_samples": len(heldout), "wall_time_s": 0.0,
                    "classifier": classifier.result()})
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


def row(metrics: dict) -> str:
    classifier = metrics.get("classifier", {})
    histogram = classifier.get("class_histogram", [])
    covered = sum(1 for share in histogram if share > 0) if histogram else ""
    return (f"| {metrics['run']} | {metrics['nfe']} | {metrics['fid']:.2f} | "
            f"{1e3 * metrics['kid']:.2f} ± {1e3 * metrics['kid_std']:.2f} | "
            f"{classifier.get('mean_confidence', float('nan')):.3f} | "
            f"{classifier.get('histogram_tv_from_uniform', float('nan')):.3f} | {covered} | "
            f"{metrics['wall_time_s']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_vp_release.py")
    parser.add_argument("--checkpoint", default="release/mnist_vp_release.safetensors")
    parser.add_argument("--workdir", default="runs/mnist_vp_release",
                        help="run directory whose eval/ caches the reference Inception statistics")
    parser.add_argument("--out", default="bench/results/sampler_quality")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--long-steps", type=int, default=1000,
                        help="steps of the long runs (0: skip them)")
    parser.add_argument("--long-samplers", nargs="+", default=list(LONG_SAMPLERS),
                        help="samplers run at --long-steps (default: ancestral ddim)")
    parser.add_argument("--samplers", nargs="+", default=None, help="default: every registered sampler")
    parser.add_argument("--runs", nargs="+", default=[], metavar="METHOD:STEPS[:KEY=VALUE,...]",
                        help="extra runs with explicit options, e.g. dpm_solver_sde:10:eta=2.0")
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
    if not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint {args.checkpoint} does not exist")
    apply_threads(args)

    from evaluation import ClassifierMetrics, InceptionFeatures

    config = load_config(args.config)
    config.sampling.batch_size = args.batch_size
    config.eval.reference_num_images = args.reference_num_images
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
    inception = InceptionFeatures(config.eval.inception_path or None, device=device,
                                  batch_size=config.eval.batch_size)
    reference = reference_features(config, Workdir(args.workdir), inception)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store_path = out / "runs.json"
    store = json.loads(store_path.read_text()) if store_path.is_file() else {}
    weights_digest = hashlib.sha1(Path(args.checkpoint).read_bytes()).hexdigest()[:10]

    def cached(key: str, compute) -> dict:
        if key not in store:
            store[key] = compute()
            on_disk = json.loads(store_path.read_text()) if store_path.is_file() else {}
            store.update({**on_disk, key: store[key]})  # keep runs another process stored
            store_path.write_text(json.dumps(store, indent=1, default=str))
        return store[key]

    floor = cached(f"floor|{args.num_samples}|{config.eval.heldout_split}|{reference.count}",
                   lambda: real_floor(config, config.eval.heldout_split, args.num_samples,
                                      inception, reference, config.sampling.seed))
    prefix = f"{weights_digest}|{args.num_samples}|{reference.count}|{config.sampling.seed}|"
    results = []
    plan = plan_runs(names, args.nfe, args.long_steps, tuple(args.long_samplers)) + extra_runs
    for name, steps, options in plan:
        label = _label(name, steps, options)

        def run(name=name, steps=steps, options=options, label=label) -> dict:
            metrics, _ = sample_quality(config, model, sde, device, method=name, steps=steps,
                                        options=options, num_samples=args.num_samples,
                                        inception=inception, reference=reference,
                                        classifier=ClassifierMetrics(device=device))
            metrics["run"] = label
            return metrics

        metrics = cached(f"{prefix}{label}|{settings(name, options, sde)}", run)
        print(f"{label}: NFE {metrics['nfe']}, FID {metrics['fid']:.2f}, {metrics['wall_time_s']:.0f} s",
              flush=True)
        results.append(metrics)

    header = ("| run | NFE | FID | KID x1e3 | classifier confidence | class histogram TV | "
              "classes seen | wall s |\n|---|---|---|---|---|---|---|---|")
    lines = [header, row(floor)] + [row(m) for m in sorted(results, key=lambda m: (m["sampler"], m["nfe"]))]
    summary = [f"Checkpoint {source} (step {step}); {args.num_samples} samples per run, seed "
               f"{config.sampling.seed}; reference: Inception statistics of the {reference.count} "
               f"training images."]
    at_10 = [m for m in results if m["nfe"] <= 10]
    long_ancestral = [m for m in results if m["run"] == f"ancestral:{args.long_steps}"]
    if at_10:
        best = min(at_10, key=lambda m: m["fid"])
        summary.append(f"Best at <= 10 NFE: {best['run']} (NFE {best['nfe']}), FID {best['fid']:.2f}; "
                       f"FID / real-data floor = {best['fid'] / floor['fid']:.2f}.")
        if long_ancestral:
            ratio = best["fid"] / long_ancestral[0]["fid"]
            summary.append(f"FID(best at 10 NFE) / FID(ancestral, {args.long_steps} steps) = "
                           f"{best['fid']:.2f} / {long_ancestral[0]['fid']:.2f} = {ratio:.2f} "
                           f"(goal <= 1.15: {'met' if ratio <= 1.15 else 'not met'}).")
    best_overall = min(results, key=lambda m: m["fid"])
    summary.append(f"Best overall: {best_overall['run']} (NFE {best_overall['nfe']}), FID "
                   f"{best_overall['fid']:.2f} = {best_overall['fid'] / floor['fid']:.2f} x the floor "
                   f"{floor['fid']:.2f}.")
    table = "\n".join(lines) + "\n\n" + "\n".join(summary)
    plot = out / f"fid_vs_nfe_{weights_digest}.png"  # one plot per weights: older ones stay
    fid_vs_nfe_plot(measured_ladder(store, prefix, sde), plot)
    publish(args, "Sampler quality on the released model", table, images=[plot])


if __name__ == "__main__":
    main()
