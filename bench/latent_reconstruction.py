"""Reconstruction through the probability-flow ODE's latent space against NFE.

    python -m bench.latent_reconstruction
    python -m bench.latent_reconstruction --images 4 --ddim 10 --dpm2 5 --tolerances 1e-3 --no-write  # quick

``--images`` held-out images of ``--split`` (the fixed evaluation subset of ``data.evaluation_subset``)
are encoded to x_T and decoded back (``sde.latent.reconstruct``) by DDIM inversion (first order)
at each of ``--ddim`` steps, by the singlestep DPM-Solver-2 (second order) at each of ``--dpm2``
steps and by the adaptive dopri5 at each of ``--tolerances``; the grids of the fixed-step
methods are uniform in log-SNR from ``--eps`` to T. For each: the per-pixel RMSE on the [-1, 1]
scale and the PSNR (peak 2) averaged over images, the network evaluations of the round trip
(encode + decode) and its wall time. Writes ``bench/results/latent_reconstruction.json``.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from bench.common import add_run_options, apply_threads, format_reading, load_config, model_text, table, write_result
from sde import data, latent
from sde.inference import load_ema_model
from sde.sdes import create_sde

NAME = "latent_reconstruction"
TITLE = "Latent reconstruction (encode and decode by the probability-flow ODE)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_vp_release.py")
    parser.add_argument("--checkpoint", default="release/mnist_vp_release.safetensors")
    parser.add_argument("--split", default="train5k")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--ddim", type=int, nargs="*", default=[10, 25, 50, 100, 200])
    parser.add_argument("--dpm2", type=int, nargs="*", default=[5, 10, 25, 50, 100])
    parser.add_argument("--tolerances", type=float, nargs="*", default=[1e-3, 1e-4, 1e-5])
    parser.add_argument("--eps", type=float, default=latent.DEFAULT_EPS)
    add_run_options(parser)
    args = parser.parse_args()
    apply_threads(args)
    config = load_config(args.config)
    model, source, step = load_ema_model(config, "", torch.device("cpu"), args.checkpoint)
    sde = create_sde(config)
    raw, _ = data.load_dataset(config, split=args.split)
    chosen, _ = data.evaluation_subset(raw, None, args.images, seed=config.seed)
    x = data.uint8_to_float(chosen, dequantize=False)
    runs = [("ddim", {"steps": steps}) for steps in args.ddim]
    runs += [("dpm_solver_2", {"steps": steps}) for steps in args.dpm2]
    runs += [("adaptive", {"rtol": tolerance, "atol": tolerance}) for tolerance in args.tolerances]
    rows = []
    for method, options in runs:
        started = time.perf_counter()
        _, info = latent.reconstruct(model, sde, x, method=method, eps=args.eps, **options)
        rows.append({"method": method, **options, "nfe": info["nfe_encode"] + info["nfe_decode"],
                     "nfe_encode": info["nfe_encode"], "rmse": info["rmse_mean"], "psnr": info["psnr_mean"],
                     "rmse_worst": max(info["rmse"]), "seconds": round(time.perf_counter() - started, 2)})
        print(f"{method} {options}: RMSE {info['rmse_mean']:.5f}, PSNR {info['psnr_mean']:.2f} dB, "
              f"{rows[-1]['nfe']} NFE, {rows[-1]['seconds']} s", flush=True)
    result = {"model": {"checkpoint": args.checkpoint, "step": step}, "split": args.split, "images": len(x),
              "eps": args.eps, "rows": rows}
    write_result(args, NAME, TITLE, result, render)


def render(result: dict) -> str:
    rows = result["rows"]
    lines = [f"Model {model_text(result['model'])}; {result['images']} images of {result['split']}, encoded from "
             f"t = {result['eps']:g} to T and decoded back; RMSE per pixel on the [-1, 1] scale, PSNR with peak 2.", ""]

    def setting(row: dict) -> str:
        return f"tolerance {row['rtol']:g}" if row["method"] == "adaptive" else f"{row['steps']} steps"

    lines.append(table(["method", "setting", "NFE (encode + decode)", "RMSE", "worst image RMSE", "PSNR (dB)", "s"],
                       [[row["method"], setting(row), row["nfe"], f"{row['rmse']:.2e}", f"{row['rmse_worst']:.2e}",
                         f"{row['psnr']:.1f}", row["seconds"]] for row in rows]))

    def ladder(method: str) -> list[dict]:
        return [row for row in rows if row["method"] == method]

    reading = []
    for method, order in (("ddim", 1), ("dpm_solver_2", 2)):
        steps = ladder(method)
        if len(steps) >= 2:
            local = [math.log(coarse["rmse"] / fine["rmse"]) / math.log(fine["steps"] / coarse["steps"])
                     for coarse, fine in zip(steps, steps[1:])]
            reading.append(f"{method}: RMSE {steps[0]['rmse']:.2e} at {steps[0]['steps']} steps to "
                           f"{steps[-1]['rmse']:.2e} at {steps[-1]['steps']}; observed order between successive "
                           f"step counts " + ", ".join(f"{value:.2f}" for value in local)
                           + f" (the method's: {order})"
                           + ("; the last gains less, near the float32 network's rounding floor."
                              if local[-1] < 0.7 * order else "."))
    adaptive = ladder("adaptive")
    if adaptive:
        reading.append("adaptive: " + ", ".join(f"tolerance {row['rtol']:g} gives RMSE {row['rmse']:.2e} in "
                                               f"{row['nfe']} NFE" for row in adaptive) + ".")
    best = min(rows, key=lambda row: row["rmse"])
    reading.append(f"Smallest error: {best['method']} at {setting(best)}, RMSE {best['rmse']:.2e} "
                   f"(PSNR {best['psnr']:.1f} dB) in {best['nfe']} NFE.")
    return "\n".join(lines) + "\n\n" + format_reading(reading)


if __name__ == "__main__":
    main()
