"""Bits/dim of one model under uniform and truncated-normal dequantization, side by side.

    python bench/dequantization.py                                   # released model, train5k
    python bench/dequantization.py --split test --num-images 50      # choose tau on training images

Both are upper bounds on -log2 P(u) / D of the 8-bit pixels by the probability-flow ODE
(sde/likelihood.py, module docstring): uniform dequantization (Theis et al. 2016; the
protocol of score_sde, the ODE from eps = 1e-5 at the dequantized pixels) and truncated-
normal dequantization (Zheng et al. 2023; the ODE from t0 at the training grid plus the
training noise cut to the pixel's bin) at each ``--truncations`` tau. Every setting sees
the same images and draws its noise from the same seed; the table gives each mean with its
standard error over images, and the per-image difference from uniform with its standard
error (the paired comparison, much tighter than the two standard errors). Appends the table
to BENCHMARKS.md. The lower a bound the better: each is a valid bits/dim on its own.
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
from sde import data, likelihood  # noqa: E402
from sde.inference import load_ema_model  # noqa: E402
from sde.sdes import create_sde  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_vp_release.py")
    parser.add_argument("--checkpoint", default="release/mnist_vp_release.safetensors",
                        help="exported .safetensors weights or a training checkpoint .pt")
    parser.add_argument("--split", default="train5k", help="images to evaluate (the protocol's held-out "
                        "split is train5k; 'test' is the release's training split)")
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--truncations", type=float, nargs="+", default=[2.0, 1.0, 0.5])
    parser.add_argument("--seed", type=int, default=0, help="image subset and noise seed")
    add_run_options(parser)
    args = parser.parse_args()
    if args.num_images < 1 or args.batch_size < 1:
        parser.error("--num-images and --batch-size must be >= 1")
    apply_threads(args)
    config = load_config(args.config)
    sde = create_sde(config)
    grid = bool(config.data.dequantize)
    for tau in args.truncations:  # refuse a bad tau before any ODE solve
        likelihood.truncation_time(sde, tau, grid)
    model, source, step = load_ema_model(config, "", torch.device("cpu"), args.checkpoint)
    images, _ = data.evaluation_subset(*data.load_dataset(config, split=args.split), args.num_images,
                                       seed=args.seed)

    settings = [("uniform", None)] + [("truncated_normal", tau) for tau in args.truncations]
    results = {}
    for dequantization, tau in settings:
        start = time.perf_counter()
        options = {"truncation": tau, "dequantized_grid": grid} if tau is not None else {}
        mean, standard_error, info = likelihood.bits_per_dim(
            model, sde, images, generator=torch.Generator().manual_seed(args.seed),
            batch_size=args.batch_size, dequantization=dequantization, **options)
        results[(dequantization, tau)] = (mean, standard_error, info, time.perf_counter() - start)
        print(f"{dequantization} tau={tau}: {mean:.4f} ± {standard_error:.4f} bits/dim, "
              f"t0 {info['t0']:.3g}, NFE {info['nfe']}, {results[(dequantization, tau)][3]:.0f} s", flush=True)

    uniform = results[("uniform", None)][2]["per_image"].mean(1)
    lines = [f"{source} (step {step}); {len(images)} {args.split} images (subset seed {args.seed}), "
             f"one draw of dequantization noise and Hutchinson probe per image, dopri5 in log-SNR at "
             f"rtol = atol = {likelihood.DEFAULT_RTOL:g}.", "",
             "| dequantization | tau | t0 | sigma(t0) | bits/dim | minus uniform, per image | NFE | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for (dequantization, tau), (mean, standard_error, info, seconds) in results.items():
        t0 = torch.tensor(info["t0"], dtype=torch.float64)
        difference = info["per_image"].mean(1) - uniform
        paired = "" if tau is None else paired_difference(difference)
        lines.append(f"| {dequantization.replace('_', '-')} | {'' if tau is None else f'{tau:g}'} | "
                     f"{info['t0']:.3g} | {sde.sigma(t0).item():.2e} | {mean:.4f} ± {standard_error:.4f} | "
                     f"{paired} | {info['nfe']} | {seconds:.0f} |")
    best = min(results, key=lambda key: results[key][0])
    lines += ["", f"Lowest bound: {best[0].replace('_', '-')}"
                  + (f" at tau = {best[1]:g}" if best[1] is not None else "")
                  + f", {results[best][0]:.4f} bits/dim."]
    table = "\n".join(lines)
    publish(args, "Bits/dim: uniform vs truncated-normal dequantization", table)


if __name__ == "__main__":
    main()
