"""``--mode compare``: samplers side by side on one network, same seeds, same sample count.

``compare.runs`` lists entries ``"method:steps"`` or ``"method:steps:key=value,key=value"``
(sampler options, e.g. ``"ddim:50:eta=1.0"``, ``"ode:2:method=dopri5"``). Each produces ``compare.num_samples`` images with the same per-sample
seeds; for each: NFE, wall time, FID, KID and (MNIST) classifier metrics. Writes
``workdir/compare/results.{json,csv,md}``, ``fid_vs_nfe.png`` and a grid per run. Under
``torchrun`` the ranks share each run's batches (``sde.run_eval.sample_quality``); the
metrics do not depend on the number of processes and only rank 0 writes and prints.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from sde import distributed, images
from sde.checkpoint import atomic_write
from sde.inference import load_ema_model
from sde.run_eval import reference_features, sample_quality
from sde.sdes import create_sde
from sde.workdir import Workdir

COLUMNS = ("run", "sampler", "steps", "nfe", "wall_time_s", "fid", "kid", "kid_std",
           "classifier_confidence", "class_histogram_tv")


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_run(entry: str) -> tuple[str, int, dict[str, Any]]:
    """``"ddim:50:eta=1.0,schedule=quadratic"`` -> ("ddim", 50, {"eta": 1.0, "schedule": "quadratic"})."""
    parts = entry.split(":")
    if len(parts) not in (2, 3) or not parts[1].strip().isdigit():
        raise ValueError(f"run entry {entry!r} is not 'method:steps' or "
                         f"'method:steps:key=value,...'")
    options = {}
    if len(parts) == 3 and parts[2]:
        for item in parts[2].split(","):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"run entry {entry!r}: option {item!r} is not key=value")
            options[key.strip()] = _parse_value(value.strip())
    return parts[0].strip(), int(parts[1]), options


def validate_runs(config) -> list[tuple[str, int, dict[str, Any]]]:
    """Parse every entry and let the sampler registry check names and options up front."""
    from sde import samplers

    runs = [parse_run(entry) for entry in config.compare.runs]
    if not runs:
        raise ValueError("compare.runs is empty; give entries like 'ddim:20'")
    sde = create_sde(config)
    for method, steps, options in runs:
        if method not in samplers.available():
            raise ValueError(f"compare.runs: unknown sampler {method!r}; accepted: "
                             f"{', '.join(samplers.available())}")
        if steps < 1:
            raise ValueError(f"compare.runs: {method}:{steps} needs steps >= 1")
        samplers.resolve_options(method, sde, options, steps)
    return runs


def _row(label: str, metrics: dict[str, Any]) -> dict[str, Any]:
    row = {"run": label, "sampler": metrics["sampler"], "steps": metrics["steps"],
           "nfe": metrics["nfe"], "wall_time_s": round(metrics["wall_time_s"], 2),
           "fid": round(metrics["fid"], 4), "kid": round(metrics["kid"], 6),
           "kid_std": round(metrics["kid_std"], 6)}
    classifier = metrics.get("classifier")
    row["classifier_confidence"] = round(classifier["mean_confidence"], 4) if classifier else ""
    row["class_histogram_tv"] = round(classifier["histogram_tv_from_uniform"], 4) if classifier else ""
    return row


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


#: Series whose legend fits beside the plot; more go below it.
LEGEND_BESIDE_MAX = 12


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = sorted({row["sampler"] for row in rows})
    crowded = len(series) > LEGEND_BESIDE_MAX  # then the legend goes below, in two columns
    legend_rows = math.ceil(len(series) / 2) if crowded else 0
    figure, axis = plt.subplots(figsize=(7.5, 4 + 0.2 * legend_rows), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, sampler in enumerate(series):
        points = sorted((row["nfe"], row["fid"]) for row in rows if row["sampler"] == sampler)
        # past the colour cycle, the same colours come back with another marker and line style;
        # a variant measured at one NFE is a marker alone, so that lines stay for ladders
        lap = index // len(colors)
        single = len(points) == 1
        axis.plot([p[0] for p in points], [p[1] for p in points], label=sampler,
                  color=colors[index % len(colors)], marker="osD^v"[lap % 5],
                  markersize=7 if single else 5,
                  linestyle="none" if single else ["-", "--", ":", "-."][lap % 4])
    axis.set_xscale("log")
    axis.set_yscale("log")  # FIDs span 10 to several hundred
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    axis.yaxis.set_major_formatter(plain)
    axis.yaxis.set_minor_formatter(plain)
    axis.set_xlabel("network evaluations per sample (NFE)")
    axis.set_ylabel("FID")
    axis.grid(True, which="both", alpha=0.3)
    if crowded:
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    else:
        axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def compare(config, workdir: str | Path) -> dict[str, Any]:
    """Run ``--mode compare``; returns the results it writes (rank 0; ``{}`` on other ranks)."""
    from evaluation import ClassifierMetrics, InceptionFeatures

    runs = validate_runs(config)
    if config.data.dataset == "toy":
        raise ValueError("--mode compare measures FID of images; data.dataset='toy' has none")
    context = distributed.setup(config.device)
    run = Workdir(workdir, create=context.is_main)
    device = context.device
    sde = create_sde(config)
    model, source, step = load_ema_model(config, workdir, device, config.sampling.checkpoint)
    inception = InceptionFeatures(config.eval.inception_path or None, device=device,
                                  batch_size=config.eval.batch_size)
    reference = reference_features(config, run, inception, shard=context.shard)

    results, rows = [], []
    for method, steps, options in runs:
        label = f"{method}:{steps}" + (":" + ",".join(f"{k}={v}" for k, v in options.items())
                                       if options else "")
        classifier = ClassifierMetrics(device=device) if config.data.dataset == "mnist" else None
        metrics, grid = sample_quality(config, model, sde, device, method=method, steps=steps,
                                       options=options, num_samples=config.compare.num_samples,
                                       inception=inception, reference=reference,
                                       classifier=classifier, progress=context.is_main,
                                       shard=context.shard)
        metrics["run"] = label
        results.append(metrics)
        rows.append(_row(label, metrics))
        if not context.is_main:
            continue
        safe = label.replace(":", "_").replace(",", "_").replace("=", "-")
        images.save_png(images.image_grid(grid), run.compare / f"grid_{safe}.png")
        print(f"{label}: NFE {metrics['nfe']}, FID {metrics['fid']:.3f}, "
              f"{metrics['wall_time_s']:.1f} s", flush=True)

    if not context.is_main:
        return {}
    output = {"checkpoint": source, "checkpoint_step": step, "num_samples": config.compare.num_samples,
              "seed": config.sampling.seed, "results": results}
    images.save_json(output, run.compare / "results.json")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(run.compare / "results.csv", lambda handle: handle.write(buffer.getvalue().encode()))
    table = markdown_table(rows)
    atomic_write(run.compare / "results.md", lambda handle: handle.write(table.encode()))
    _plot(rows, run.compare / "fid_vs_nfe.png")
    output["message"] = table
    return output
