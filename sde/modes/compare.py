"""``--mode compare``: samplers side by side on one network, same seeds, same sample count.

``compare.runs`` lists entries ``"method:steps"`` or ``"method:steps:key=value,key=value"``
(sampler options, e.g. ``"ddim:50:eta=1.0"``, ``"ode:2:method=dopri5"``, each value read
through the option's type: ``samplers.parse_run``). Each produces ``compare.num_samples``
images with the same per-sample seeds; for each: NFE, wall time, FID, KID and the data
set's classifier metrics. Writes
``workdir/compare/results.{json,csv,md}``, ``fid_vs_nfe.png`` and a grid per run. Under
``torchrun`` the ranks share each run's batches (``sde.run_eval.sample_quality``); the
metrics do not depend on the number of processes and only rank 0 writes and prints.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from sde import configuration, data, distributed, environment, images, samplers
from sde.checkpoint import atomic_write
from sde.inference import load_ema_model
from sde.quality import check_cache_dir, classifier_metrics_for, inception_for, reference_features, sample_quality
from sde.sdes import create_sde
from sde.workdir import Workdir

COLUMNS = ("run", "sampler", "steps", "nfe", "wall_time_s", "fid", "kid", "kid_std",
           "classifier_confidence", "class_histogram_tv")


def validate_runs(config) -> list[tuple[str, int, dict[str, Any]]]:
    """Parse every entry (``samplers.parse_run``) and let each sampler's spec check its
    options up front; returns the runs."""
    if not config.compare.runs:
        raise ValueError("compare.runs is empty; give entries like 'ddim:20'")
    sde = create_sde(config)
    runs = []
    for entry in config.compare.runs:
        try:
            method, steps, options = samplers.parse_run(entry)
            if steps < 1:
                raise ValueError(f"{method}:{steps} needs steps >= 1")
            samplers.resolve_options(method, sde, options, steps)
        except (ValueError, FileNotFoundError) as error:
            raise type(error)(f"compare.runs: {error}") from error
        runs.append((method, steps, options))
    return runs


def check(config) -> None:
    """The config of a comparison: one clear ValueError on the first problem."""
    configuration.validate(config)
    dataset = data.get_dataset(config.data.dataset)
    if not dataset.is_image:
        raise ValueError(f"--mode compare measures FID of images; data.dataset={dataset.name!r} has none")
    validate_runs(config)
    configuration.sampling_labels(config, config.compare.num_samples)  # every run draws these classes
    check_cache_dir(config)


def run(config, workdir: str | Path) -> dict[str, Any]:
    """``--mode compare``: check the config, then compare (``compare``)."""
    check(config)
    return compare(config, workdir)


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


def compare(config, workdir: str | Path) -> dict[str, Any]:
    """Run ``--mode compare``; returns the results it writes (rank 0; ``{}`` on other ranks)."""
    runs = validate_runs(config)
    context = distributed.setup(config.device, config.tf32)
    run = Workdir(workdir, create=context.is_main)
    device = context.device
    sde = create_sde(config)
    model, source, step = load_ema_model(config, workdir, device, config.sampling.checkpoint)
    running_on = environment.announce(device, processes=context.world_size, model=model, show=context.is_main)
    inception = inception_for(config, device)
    reference = reference_features(config, inception, shard=context.shard)

    results, rows = [], []
    for entry, (method, steps, options) in zip(config.compare.runs, runs):
        label = "".join(entry.split())  # the run as written
        classifier = classifier_metrics_for(config, device)
        metrics, grid = sample_quality(config, model, sde, device, method=method, steps=steps,
                                       options=options, num_samples=config.compare.num_samples,
                                       inception=inception, reference=reference,
                                       classifier=classifier, progress=context.is_main,
                                       shard=context.shard, guidance=config.sampling.guidance,
                                       labels=configuration.sampling_labels(config, config.compare.num_samples))
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
    output = {"checkpoint": source, "checkpoint_step": step, "environment": running_on,
              "num_samples": config.compare.num_samples,
              "seed": config.sampling.seed, "results": results}
    images.save_json(output, run.compare / "results.json")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(run.compare / "results.csv", lambda handle: handle.write(buffer.getvalue().encode()))
    table = markdown_table(rows)
    atomic_write(run.compare / "results.md", lambda handle: handle.write(table.encode()))
    images.fid_vs_nfe_plot(rows, run.compare / "fid_vs_nfe.png")
    output["message"] = table
    return output
