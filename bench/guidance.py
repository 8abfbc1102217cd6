"""Classifier-free guidance on the conditional MNIST release: FID and class accuracy against w.

    python -m bench.guidance                                         # about 25 minutes on 2 cores
    python -m bench.guidance --samples 200 --guidance 0 2 --no-write  # a quick look

For each guidance scale w of ``--guidance`` the conditional release draws ``--samples``
class-balanced digits (sample k of class k mod 10) with one sampler at a fixed step count
(``--method``, ``--steps``; a guided step costs two network evaluations per sample). Each
set is scored as ``--mode eval`` scores samples: FID and KID against the Inception statistics
of the 10,000 training digits (cached once per machine), and the MNIST classifier's accuracy
against the requested class (overall and per class), its mean confidence and the confusion
matrix. Beside them: the same network drawing without labels (the null label, the
unconditional law it learned by label dropout) and the unconditional release, both with the
same sampler and steps, unguided, so at half the guided rows' network evaluations. Writes
``bench/results/guidance.json``, the plot of FID and accuracy against w (``guidance.png``),
the confusion matrix at the w of the lowest FID (``guidance_confusion.png``) and, for the
README, a grid with one class per row at that w (``docs/mnist_cond_classes.png``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import REPO, add_run_options, apply_threads, format_reading, load_config, model_text, plot_path, \
    table, write_result
from evaluation import ClassifierMetrics
from sde import conditioning, images
from sde.inference import load_ema_model
from sde.quality import inception_for, reference_features, sample_quality
from sde.sdes import create_sde

NAME, TITLE = "guidance", "Classifier-free guidance: FID and class accuracy against w"
GRID = REPO / "docs" / "mnist_cond_classes.png"
GRID_PER_CLASS = 10


def measure(config, model, sde, *, method: str, steps: int, samples: int, labels, guidance: float,
            inception, reference) -> tuple[dict, np.ndarray]:
    """One sampling run scored: FID, KID, classifier metrics (accuracy when labelled)."""
    config = config.copy_and_resolve_references()
    config.sampling.batch_size = min(samples, 100)
    metrics, grid = sample_quality(config, model, sde, torch.device("cpu"), method=method, steps=steps, options={},
                                   num_samples=samples, inception=inception, reference=reference,
                                   classifier=ClassifierMetrics(), progress=True, labels=labels, guidance=guidance)
    classifier = metrics["classifier"]
    row = {"guidance": guidance, "nfe": metrics["nfe"], "fid": metrics["fid"], "kid": metrics["kid"],
           "confidence": classifier["mean_confidence"], "histogram_tv": classifier["histogram_tv_from_uniform"],
           "seconds": round(metrics["sampling_time_s"], 1)}
    if "accuracy" in classifier:
        row.update(accuracy=classifier["accuracy"], per_class_accuracy=classifier["per_class_accuracy"],
                   confusion=classifier["confusion"])
    return row, grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_vp_cond.py")
    parser.add_argument("--checkpoint", default="release/mnist_vp_cond.safetensors")
    parser.add_argument("--unconditional-config", default="configs/mnist_vp_release.py")
    parser.add_argument("--unconditional-checkpoint", default="release/mnist_vp_release.safetensors")
    parser.add_argument("--guidance", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--method", default="dpm_solver")
    parser.add_argument("--steps", type=int, default=20)
    add_run_options(parser)
    args = parser.parse_args()
    apply_threads(args)
    if any(w < 0 for w in args.guidance) or args.samples < 10:
        parser.error("--guidance takes numbers >= 0 and --samples at least 10")
    config = load_config(args.config)
    device = torch.device("cpu")
    model, _, step = load_ema_model(config, "", device, args.checkpoint)
    classes = conditioning.num_classes(model)
    if not classes:
        parser.error(f"{args.checkpoint} is an unconditional model; give the conditional release")
    sde = create_sde(config)
    inception = inception_for(config, device)
    reference = reference_features(config, inception)
    labels = conditioning.resolve_labels(conditioning.BALANCED, args.samples, classes)

    rows, grids = [], {}
    for guidance in args.guidance:
        started = time.perf_counter()
        row, grid = measure(config, model, sde, method=args.method, steps=args.steps, samples=args.samples,
                            labels=labels, guidance=guidance, inception=inception, reference=reference)
        rows.append(row)
        grids[guidance] = grid
        print(f"w = {guidance:g}: FID {row['fid']:.2f}, accuracy {row['accuracy']:.3f}, confidence "
              f"{row['confidence']:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    null_row, _ = measure(config, model, sde, method=args.method, steps=args.steps, samples=args.samples,
                          labels=None, guidance=0.0, inception=inception, reference=reference)
    print(f"no label: FID {null_row['fid']:.2f}", flush=True)
    unconditional_config = load_config(args.unconditional_config)
    unconditional, _, unconditional_step = load_ema_model(unconditional_config, "", device,
                                                          args.unconditional_checkpoint)
    release_row, _ = measure(unconditional_config, unconditional, create_sde(unconditional_config),
                             method=args.method, steps=args.steps, samples=args.samples, labels=None, guidance=0.0,
                             inception=inception, reference=reference)
    print(f"unconditional release: FID {release_row['fid']:.2f}", flush=True)

    best = min(rows, key=lambda row: row["fid"])
    result = {"model": {"checkpoint": args.checkpoint, "step": step}, "sampler": args.method, "steps": args.steps,
              "samples": args.samples, "reference_images": reference.count, "rows": rows,
              "no_label": null_row,
              "unconditional": {"model": {"checkpoint": args.unconditional_checkpoint, "step": unconditional_step},
                                **release_row}}
    if not args.no_write:
        plot(rows, plot_path(args, NAME))
        confusion_plot(best, plot_path(args, f"{NAME}_confusion"))
        images.save_png(class_grid(grids[best["guidance"]], labels), GRID)
        result["figures"] = [f"bench/results/{NAME}.png", f"bench/results/{NAME}_confusion.png",
                             str(GRID.relative_to(REPO))]
    write_result(args, NAME, TITLE, result, render)


def class_grid(grid: np.ndarray, labels: torch.Tensor) -> np.ndarray:
    """The first samples of each class (up to ``GRID_PER_CLASS``, as many for every class),
    one class per row."""
    labels = labels[:len(grid)].numpy()
    indices = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    per_class = min(GRID_PER_CLASS, *(len(found) for found in indices))
    return images.image_grid(np.concatenate([grid[found[:per_class]] for found in indices]), nrow=per_class)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = [row["guidance"] for row in rows]
    figure, fid_axis = plt.subplots(figsize=(5.5, 3.6))
    fid_axis.plot(ws, [row["fid"] for row in rows], "o-", color="tab:blue", label="FID")
    fid_axis.set_xlabel("guidance scale w")
    fid_axis.set_ylabel("FID (lower is better)", color="tab:blue")
    fid_axis.set_xticks(ws)
    accuracy_axis = fid_axis.twinx()
    accuracy_axis.plot(ws, [row["accuracy"] for row in rows], "s--", color="tab:red", label="accuracy")
    accuracy_axis.set_ylabel("class accuracy", color="tab:red")
    fid_axis.set_title("Classifier-free guidance, conditional MNIST")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def confusion_plot(row: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = np.asarray(row["confusion"], dtype=np.float64)
    rates = confusion / confusion.sum(1, keepdims=True).clip(min=1)
    figure, axis = plt.subplots(figsize=(4.6, 4.0))
    shown = axis.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (i, j), value in np.ndenumerate(rates):
        if value >= 0.01:
            axis.text(j, i, f"{value:.2f}"[1:] if value < 1 else "1", ha="center", va="center", fontsize=6,
                      color="white" if value > 0.5 else "black")
    axis.set_xticks(range(10))
    axis.set_yticks(range(10))
    axis.set_xlabel("class recognised")
    axis.set_ylabel("class asked for")
    axis.set_title(f"w = {row['guidance']:g}: accuracy {row['accuracy']:.3f}")
    figure.colorbar(shown, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def render(result: dict) -> str:
    rows, null, release = result["rows"], result["no_label"], result["unconditional"]
    lines = [f"Model {model_text(result['model'])}; {result['samples']:,} class-balanced samples per row from "
             f"{result['sampler']} at {result['steps']} steps (NFE counts both evaluations of a guided step), "
             f"FID against the {result['reference_images']:,} training digits. Accuracy: the MNIST classifier "
             f"recognises the class asked for.", ""]
    body = [[f"{row['guidance']:g}", row["nfe"], f"{row['fid']:.2f}", f"{row['kid']:.4f}", f"{row['accuracy']:.3f}",
             f"{min(row['per_class_accuracy']):.2f}", f"{row['confidence']:.3f}", row["seconds"]] for row in rows]
    body.append(["no label", null["nfe"], f"{null['fid']:.2f}", f"{null['kid']:.4f}", "", "",
                 f"{null['confidence']:.3f}", null["seconds"]])
    body.append([f"unconditional release ({model_text(release['model'])})", release["nfe"], f"{release['fid']:.2f}",
                 f"{release['kid']:.4f}", "", "", f"{release['confidence']:.3f}", release["seconds"]])
    lines.append(table(["w", "NFE", "FID", "KID", "accuracy", "worst class", "confidence", "s"], body))
    best_fid = min(rows, key=lambda row: row["fid"])
    best_accuracy = max(rows, key=lambda row: row["accuracy"])
    unguided = next((row for row in rows if row["guidance"] == 0), None)
    reading = [f"Lowest FID at w = {best_fid['guidance']:g} ({best_fid['fid']:.2f}), with accuracy "
               f"{best_fid['accuracy']:.3f}; highest accuracy at w = {best_accuracy['guidance']:g} "
               f"({best_accuracy['accuracy']:.3f}, FID {best_accuracy['fid']:.2f})."]
    if unguided is not None:
        reading.append(f"Unguided (w = 0) FID {unguided['fid']:.2f} against the unconditional release's "
                       f"{release['fid']:.2f} at the same sampler and steps; the same network without labels: "
                       f"{null['fid']:.2f}.")
    figures = result.get("figures", [])
    if figures:
        reading.append(f"At the lowest FID: the confusion matrix `{figures[1]}` and the class grid `{figures[2]}` "
                       f"(the README's).")
        lines += ["", f"![FID and class accuracy against the guidance scale]({figures[0]})"]
    return "\n".join(lines) + "\n\n" + format_reading(reading)


if __name__ == "__main__":
    main()
