"""Held-out bits/dim of several checkpoints of one architecture, paired on the same images.

    python -m bench.investigations.checkpoint_bpd --checkpoints release/mnist_vp_release.safetensors \
        runs/release_lw/checkpoints/checkpoint_500.pt runs/release_lw/checkpoints/checkpoint_1000.pt

For following a fine-tune (``configs/mnist_vp_release_lw.py``) or comparing training
variants: every checkpoint sees the same images and the same dequantization noise and
Hutchinson probe (one seeded generator per checkpoint), so the per-image difference from
the first checkpoint is a paired comparison whose standard error is far below the spread
of the images' bits/dim. Probability-flow ODE with the dequantization of ``--config``'s
``eval`` group (truncated-normal at ``eval.bpd_truncation`` or uniform; sde/likelihood).
Writes ``bench/results/checkpoint_bpd.json``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.common import (add_run_options, apply_threads, format_reading, load_config, paired,
                          repo_relative, table, write_result)
from sde import data, likelihood
from sde.checkpoint import CheckpointError
from sde.inference import load_ema_model
from sde.modes import evaluate
from sde.sdes import create_sde

NAME, TITLE = "checkpoint_bpd", "Bits/dim of checkpoints, paired"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_vp_release_lw.py")
    parser.add_argument("--checkpoints", nargs="+", required=True,
                        help=".safetensors weights or checkpoint .pt files (EMA); the first is the baseline")
    parser.add_argument("--split", default="train5k", help="images to evaluate (held-out: train5k)")
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="image subset and noise seed")
    add_run_options(parser)
    args = parser.parse_args()
    if args.num_images < 1 or args.batch_size < 1:
        parser.error("--num-images and --batch-size must be >= 1")
    missing = [path for path in args.checkpoints if not Path(path).is_file()]
    if missing:
        parser.error(f"no such checkpoint: {', '.join(missing)}")
    apply_threads(args)
    config = load_config(args.config)
    try:
        evaluate.check(config)  # the eval group's dequantization and tau, before any solve
    except ValueError as error:
        parser.error(f"--config {args.config}: {error}")
    sde = create_sde(config)
    dequantization = config.eval.bpd_dequantization
    options = ({"truncation": config.eval.bpd_truncation, "dequantized_grid": bool(config.data.dequantize)}
               if dequantization == "truncated_normal" else {})
    try:  # every checkpoint loads (and matches the config) before the first solve
        models = [load_ema_model(config, "", torch.device("cpu"), path) for path in args.checkpoints]
    except (CheckpointError, ValueError) as error:
        parser.error(str(error))
    images, _ = data.evaluation_subset(*data.load_dataset(config, split=args.split), args.num_images,
                                       seed=args.seed)

    rows = []
    for model, source, step in models:
        start = time.perf_counter()
        mean, standard_error, info = likelihood.bits_per_dim(
            model, sde, images, generator=torch.Generator().manual_seed(args.seed),
            batch_size=args.batch_size, dequantization=dequantization, **options)
        rows.append((source, step, mean, standard_error, info["per_image"].mean(1), info["nfe"],
                     time.perf_counter() - start))
        print(f"{source} (step {step}): {mean:.4f} ± {standard_error:.4f} bits/dim, NFE {info['nfe']}, "
              f"{rows[-1][-1]:.0f} s", flush=True)

    baseline = rows[0][4]
    result_rows = []
    for index, (source, step, mean, standard_error, per_image, nfe, seconds) in enumerate(rows):
        row = {"checkpoint": repo_relative(source), "step": step, "bpd": mean, "bpd_se": standard_error,
               "nfe": nfe, "seconds": seconds}
        if index:
            difference = per_image - baseline
            row["minus_first"], row["minus_first_se"] = paired(difference)
            row["images_improved"] = int((difference < 0).sum())
        result_rows.append(row)
    result = {"config": repo_relative(args.config), "split": args.split, "num_images": len(images),
              "seed": args.seed, "dequantization": dequantization,
              "truncation": config.eval.bpd_truncation if dequantization == "truncated_normal" else None,
              "rtol": likelihood.DEFAULT_RTOL, "rows": result_rows}
    write_result(args, NAME, TITLE, result, render)


def render(result: dict) -> str:
    setting = (f"truncated-normal dequantization at τ = {result['truncation']:g}"
               if result["dequantization"] == "truncated_normal" else "uniform dequantization")
    rows = result["rows"]
    body = [[row.get("description") or f"`{row['checkpoint']}`", f"{row['step']:,}",
             f"{row['bpd']:.4f} ± {row['bpd_se']:.4f}",
             f"{row['minus_first']:+.4f} ± {row['minus_first_se']:.4f}" if "minus_first" in row else "",
             f"{row['images_improved']} / {result['num_images']}" if "images_improved" in row else "",
             row["nfe"]] for row in rows]
    parts = [f"{result['num_images']} {result['split']} images (subset seed {result['seed']}), {setting}, one draw "
             "of dequantization noise and Hutchinson probe per image, the same for every checkpoint; dopri5 in "
             f"log-SNR at rtol = atol = {result['rtol']:g}.", "",
             table(["checkpoint", "step", "bits/dim", "minus the first, per image", "images improved", "NFE"], body)]
    if result.get("note"):
        parts += ["", result["note"]]
    lines = []
    series = [row for row in rows[1:] if row.get("series") == "weighted"]
    if series:
        steps = [rows[0]] + series
        values = [later["bpd"] - earlier["bpd"] for earlier, later in zip(steps, steps[1:])]
        stages = ", ".join(f"{row['step']:,}" for row in series)
        shrinking = len(values) > 1 and all(abs(b) < abs(a) for a, b in zip(values, values[1:]))
        lines.append(f"Likelihood-weighted fine-tuning, bits/dim gained per stage (to steps {stages}): "
                     + ", ".join(f"{value:+.3f}" for value in values)
                     + ("; the gain shrinks stage by stage, so more fine-tuning will not bring this network "
                        "near 1 bit/dim." if shrinking else "."))
    control = next((row for row in rows if row.get("series") == "control"), None)
    weighted = next((row for row in series if control and row["step"] == control["step"]), None)
    if control and weighted:
        lines.append(f"At {control['step']:,} steps the likelihood weighting takes {-weighted['minus_first']:.3f} "
                     f"bits/dim off, the same steps of the release's own loss {-control['minus_first']:.3f}: "
                     f"{weighted['minus_first'] / control['minus_first']:.2f}x as much.")
    return "\n".join(parts) + ("\n\n" + format_reading(lines) if lines else "")


if __name__ == "__main__":
    main()
