"""Held-out bits/dim of several checkpoints of one architecture, paired on the same images.

    python bench/checkpoint_bpd.py --checkpoints release/mnist_vp_release.safetensors \
        runs/release_lw/checkpoints/checkpoint_500.pt runs/release_lw/checkpoints/checkpoint_1000.pt

For following a fine-tune (``configs/mnist_vp_release_lw.py``) or comparing training
variants: every checkpoint sees the same images and the same dequantization noise and
Hutchinson probe (one seeded generator per checkpoint), so the per-image difference from
the first checkpoint is a paired comparison whose standard error is far below the spread
of the images' bits/dim. Probability-flow ODE with the dequantization of ``--config``'s
``eval`` group (truncated-normal at ``eval.bpd_truncation`` or uniform; sde/likelihood.py).
Appends the table to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import add_run_options, apply_threads, load_config, paired_difference, publish  # noqa: E402
from sde.checkpoint import CheckpointError  # noqa: E402
from sde.configuration import validate  # noqa: E402
from sde import data, likelihood  # noqa: E402
from sde.inference import load_ema_model  # noqa: E402
from sde.sdes import create_sde  # noqa: E402


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
        validate(config, "eval")  # the eval group's dequantization and tau, before any solve
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

    setting = (f"truncated-normal dequantization at tau = {config.eval.bpd_truncation:g}"
               if dequantization == "truncated_normal" else "uniform dequantization")
    baseline = rows[0][4]
    lines = [f"{len(images)} {args.split} images (subset seed {args.seed}), {setting}, one draw of "
             f"dequantization noise and Hutchinson probe per image, the same for every checkpoint; "
             f"dopri5 in log-SNR at rtol = atol = {likelihood.DEFAULT_RTOL:g}.", "",
             "| checkpoint | step | bits/dim | minus the first, per image | images improved | NFE | seconds |",
             "|---|---|---|---|---|---|---|"]
    for index, (source, step, mean, standard_error, per_image, nfe, seconds) in enumerate(rows):
        difference = per_image - baseline
        paired = "" if index == 0 else paired_difference(difference)
        improved = "" if index == 0 else f"{int((difference < 0).sum())} / {len(difference)}"
        lines.append(f"| {source} | {step} | {mean:.4f} ± {standard_error:.4f} | {paired} | {improved} | "
                     f"{nfe} | {seconds:.0f} |")
    table = "\n".join(lines)
    publish(args, "Bits/dim of checkpoints, paired", table)


if __name__ == "__main__":
    main()
