"""Bits/dim of one model under uniform and truncated-normal dequantization, side by side.

    python -m bench.investigations.dequantization                    # released model, train5k
    python -m bench.investigations.dequantization --split test --num-images 50   # choose tau on training images

Both are upper bounds on -log2 P(u) / D of the 8-bit pixels by the probability-flow ODE
(sde/likelihood, module docstring): uniform dequantization (Theis et al. 2016; the
protocol of score_sde, the ODE from eps = 1e-5 at the dequantized pixels) and truncated-
normal dequantization (Zheng et al. 2023; the ODE from t0 at the training grid plus the
training noise cut to the pixel's bin) at each ``--truncations`` tau. Every setting sees
the same images and draws its noise from the same seed; the table gives each mean with its
standard error over images, and the per-image difference from uniform with its standard
error (the paired comparison, much tighter than the two standard errors). Writes
``bench/results/dequantization.json``. The lower a bound the better: each is a valid bits/dim
on its own.
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.common import (add_run_options, apply_threads, footnotes, format_reading, load_config, model_text, paired,
                          repo_relative, table, write_result)
from sde import data, likelihood
from sde.inference import load_ema_model
from sde.sdes import create_sde

NAME, TITLE = "dequantization", "Bits/dim: uniform vs truncated-normal dequantization"


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
    rows = []
    for (dequantization, tau), (mean, standard_error, info, seconds) in results.items():
        t0 = torch.tensor(info["t0"], dtype=torch.float64)
        row = {"dequantization": dequantization, "tau": tau, "t0": info["t0"], "sigma_t0": sde.sigma(t0).item(),
               "bpd": mean, "bpd_se": standard_error, "nfe": info["nfe"], "seconds": seconds}
        if tau is not None:
            row["minus_uniform"], row["minus_uniform_se"] = paired(info["per_image"].mean(1) - uniform)
        rows.append(row)
    result = {"model": {"checkpoint": repo_relative(source), "step": step, "config": repo_relative(args.config)},
              "split": args.split, "num_images": len(images), "seed": args.seed,
              "rtol": likelihood.DEFAULT_RTOL, "rows": rows}
    write_result(args, NAME, TITLE, result, render)


def _cell(row: dict) -> str:
    text = f"{row['bpd']:.4f}"
    if "minus_uniform" in row:
        text += f" ({row['minus_uniform']:+.4f} ± {row['minus_uniform_se']:.4f})"
    return text


def _describe(result: dict) -> str:
    return f"{model_text(result['model'])}, {result['num_images']} {result['split']} images"


def render(result: dict) -> str:
    supplements = result.get("supplements", [])
    markers, notes = footnotes(supplements)
    runs = [(result, "")] + list(zip(supplements, markers))
    taus = sorted({row["tau"] for run, _ in runs for row in run["rows"] if row["tau"] is not None}, reverse=True)
    columns = ["uniform"] + [f"τ = {tau:g}" for tau in taus]

    def column(row: dict) -> str:
        return "uniform" if row["tau"] is None else f"τ = {row['tau']:g}"

    body = []
    for run, marker in runs:
        cells = {column(row): _cell(row) for row in run["rows"]}
        body.append([_describe(run) + marker] + [cells.get(c, "") for c in columns])
    parts = [f"Bits/dim by the probability-flow ODE (dopri5 in log-SNR at rtol = atol = {result['rtol']:g}), "
             "one draw of dequantization noise and Hutchinson probe per image, the same for every "
             "setting of a row; in brackets the per-image difference from uniform dequantization "
             "(mean ± standard error, the paired comparison). Truncated-normal dequantization "
             "(Zheng et al. 2023) at truncation τ; uniform is score_sde's protocol.", "",
             table(["model, images"] + columns, body)]
    if notes:
        parts += [""] + notes
    best = {}
    for run, marker in runs:
        lowest = min(run["rows"], key=lambda row: row["bpd"])
        uniform = next(row for row in run["rows"] if row["tau"] is None)
        best.setdefault(column(lowest), []).append(f"{_describe(run)}{marker}, {lowest['bpd']:.4f} against "
                                                   f"{uniform['bpd']:.4f} uniform")
    reading = [f"Lowest bound at {where}: " + "; ".join(cases) + "." for where, cases in best.items()]
    return "\n".join(parts) + "\n\n" + format_reading(reading)


if __name__ == "__main__":
    main()
