"""Can a fixed-step multistep integrator give ODE bits/dim at one network evaluation per step?

    python -m bench.investigations.likelihood_multistep        # the released model, train5k
    python -m bench.investigations.likelihood_multistep --config configs/mnist_vp_release_lw.py \
        --checkpoint release/mnist_vp_release_lw.safetensors --steps 50 60

The toolkit's likelihood (``sde.likelihood.ode_log_likelihood``) integrates the augmented
probability-flow ODE with adaptive dopri5: five or six network evaluations per step. A
multistep method pays one per step, reusing the denoised estimates of earlier steps. Here the
state x follows the exponential integrator of DPM-Solver++(3M) in the log-SNR lambda, run
from the data (lambda(eps)) to the prior (lambda(T)): with x~ = x / alpha, h = lambda_next -
lambda and x0_hat = (x - sigma eps_theta) / alpha (Lu et al. 2022b, eq. 9 and App. B; the
third-order form of k-diffusion's ``sample_dpmpp_3m_sde`` at eta = 0),

    x~_next = e^(-h) x~ + (1 - e^(-h)) x0_hat + phi_2 D_1 - phi_3 D_2,
    phi_2 = (e^(-h) - 1) / h + 1,  phi_3 = phi_2 / h - 1/2,

with D_1, D_2 the first and second divided differences of x0_hat over the last three points.
The log-density change delta = int div_x (dx/dlambda) dlambda takes the trapezoidal rule over
the same points (the divergence by one Hutchinson probe, as the toolkit's). Steps are
uniform in lambda; NFE = steps + 1. Each run is scored against a float64 reference (dopri5 at
``--reference-tol`` in lambda) on the same images, dequantization noise and probe, beside the
toolkit's adaptive default. VP SDE only (the update assumes alpha^2 + sigma^2 = 1). Writes
``bench/results/likelihood_multistep.json``.
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch

from bench.common import (add_run_options, apply_threads, format_reading, load_config, model_text, repo_relative,
                          table, write_result)
from sde import likelihood
from sde.data import evaluation_subset, load_dataset, uint8_to_float
from sde.inference import load_ema_model
from sde.likelihood.common import counted_network
from sde.likelihood.ode import _AugmentedFlow
from sde.sdes import VPSDE, create_sde

NAME, TITLE = "likelihood_multistep", "Likelihood by a fixed-step multistep integrator"
Tensor = torch.Tensor


def multistep_log_likelihood(model, sde, x: Tensor, probe: Tensor, *, eps: float, steps: int) -> tuple[Tensor, int]:
    """log p_eps(x) [B] by DPM-Solver++(3M) for x and the trapezoid for delta (module
    docstring); returns it and the network evaluations."""
    counted, _ = counted_network(model, x)
    flow = _AugmentedFlow(counted, sde, "t", "rademacher", probe)
    ends = sde.log_snr(torch.tensor([eps, sde.T], dtype=torch.float64))
    lam = ends[0] + torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64) * (ends[1] - ends[0])
    t = sde.t_from_log_snr(lam).double()
    t[0], t[-1] = eps, sde.T
    alpha, sigma = sde.alpha(t).double(), sde.sigma(t).double()
    dims, batch = x[0].numel(), x.shape[0]
    state, delta = x.double().clone(), torch.zeros(batch, dtype=torch.float64)
    denoised, rate = [], None
    with torch.no_grad():
        for k in range(steps + 1):
            eps_hat, div_eps = flow._eps_and_divergence(state, t[k].expand(batch))
            new_rate = sigma[k] ** 2 * dims - sigma[k] * div_eps  # d delta / d lambda on VP
            if rate is not None:
                delta = delta + 0.5 * (rate + new_rate) * (lam[k] - lam[k - 1])
            rate = new_rate
            if k == steps:
                break
            denoised.append((state - sigma[k] * eps_hat) / alpha[k])
            h = lam[k + 1] - lam[k]
            phi_2 = torch.expm1(-h) / h + 1.0
            scaled = torch.exp(-h) * state / alpha[k] - torch.expm1(-h) * denoised[-1]
            if len(denoised) >= 3:
                r0, r1 = (lam[k] - lam[k - 1]) / h, (lam[k - 1] - lam[k - 2]) / h
                d1_0 = (denoised[-1] - denoised[-2]) / r0
                d1_1 = (denoised[-2] - denoised[-3]) / r1
                d_1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d_2 = (d1_0 - d1_1) / (r0 + r1)
                scaled = scaled + phi_2 * d_1 - (phi_2 / h - 0.5) * d_2
            elif len(denoised) == 2:
                scaled = scaled + phi_2 * (denoised[-1] - denoised[-2]) / ((lam[k] - lam[k - 1]) / h)
            state = alpha[k + 1] * scaled
    return sde.prior_logp(state) + delta, counted.nfe


def render(result: dict) -> str:
    rows = [[row["method"], row["nfe"], f"{row['seconds']:.1f}", f"{row['error_mean_bpd']:.1e}",
             f"{row['error_max_image_bpd']:.1e}"] for row in result["rows"]]
    parts = [f"{model_text(result['model'])}; {result['num_images']} train5k images, one dequantization draw and "
             f"one Hutchinson probe per image shared by every row; error against dopri5 at "
             f"{result['reference_tol']:g} in log-SNR with a float64 network ({result['reference_bpd']:.4f} "
             "bits/dim):", "",
             table(["method", "NFE", "seconds", "abs error of mean bits/dim", "worst image"], rows)]
    default = result["rows"][0]
    passing = [row for row in result["rows"][1:]
               if row["error_mean_bpd"] <= 0.005 and row["error_max_image_bpd"] <= 0.01]
    reading = [f"The adaptive default takes {default['nfe']} NFE for an error of {default['error_mean_bpd']:.4f} "
               f"bits/dim (worst image {default['error_max_image_bpd']:.4f})."]
    if passing:
        best = min(passing, key=lambda row: row["nfe"])
        reading.append(f"The fewest multistep evaluations within 0.005 bits/dim (worst image 0.01): "
                       f"{best['method']}, {best['nfe']} NFE, {default['nfe'] / best['nfe']:.2f}x fewer.")
    else:
        reading.append("No multistep run is within 0.005 bits/dim (worst image 0.01).")
    multistep = result["rows"][1:]
    if len(multistep) > 1:
        orders = [math.log(a["error_max_image_bpd"] / b["error_max_image_bpd"]) / math.log(b["nfe"] / a["nfe"])
                  for a, b in zip(multistep, multistep[1:])]
        reading.append(f"The worst image's error falls as NFE^-p with p from {min(orders):.1f} to {max(orders):.1f} "
                       "between neighbouring step counts; the grid is fixed, so nothing bounds the error of "
                       "another model at the same steps.")
    return "\n".join(parts) + "\n\n" + format_reading(reading)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_vp_release.py")
    parser.add_argument("--checkpoint", default="release/mnist_vp_release.safetensors")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 40, 50, 60])
    parser.add_argument("--reference-tol", type=float, default=1e-6)
    add_run_options(parser)
    args = parser.parse_args()
    if min(args.steps) < 1 or args.num_images < 1:
        parser.error("--steps and --num-images must be >= 1")
    apply_threads(args)
    config = load_config(args.config)
    config.data.download = False
    sde = create_sde(config)
    if not isinstance(sde, VPSDE):
        parser.error(f"the multistep update assumes the VP SDE; {args.config} has {type(sde).__name__}")
    model, source, step = load_ema_model(config, "", torch.device("cpu"), args.checkpoint)
    images, _ = evaluation_subset(*load_dataset(config, "train5k"), args.num_images, seed=args.seed)
    dims = images[0].numel()
    generator = torch.Generator().manual_seed(args.seed)
    x = uint8_to_float(images, dequantize=True, generator=generator)
    probe = 2.0 * torch.randint(0, 2, x.shape, generator=generator).double() - 1.0
    eps = likelihood.DEFAULT_EPS

    def bpd_of(logp: Tensor) -> Tensor:
        return likelihood.dequantized_bits_per_dim(logp.double(), dims)

    reference_logp, _ = likelihood.ode_log_likelihood(copy.deepcopy(model).double(), sde, x, probe=probe, eps=eps,
                                                      rtol=args.reference_tol, atol=args.reference_tol)
    reference = bpd_of(reference_logp)
    print(f"reference: {reference.mean():.5f} bits/dim", flush=True)

    def row(method: str, bpd: Tensor, nfe: int, seconds: float) -> dict:
        result = {"method": method, "nfe": nfe, "seconds": seconds,
                  "error_mean_bpd": abs(bpd.mean() - reference.mean()).item(),
                  "error_max_image_bpd": (bpd - reference).abs().max().item()}
        print(f"{method}: NFE {nfe}, {seconds:.1f} s, error {result['error_mean_bpd']:.1e} "
              f"(worst image {result['error_max_image_bpd']:.1e})", flush=True)
        return result

    start = time.perf_counter()
    logp, info = likelihood.ode_log_likelihood(model, sde, x, probe=probe, eps=eps)
    rows = [row(f"adaptive default (dopri5 in {likelihood.DEFAULT_VARIABLE}, {likelihood.DEFAULT_RTOL:g})",
                bpd_of(logp), info["nfe"], time.perf_counter() - start)]
    for steps in sorted(args.steps):
        start = time.perf_counter()
        logp, nfe = multistep_log_likelihood(model, sde, x, probe, eps=eps, steps=steps)
        rows.append(row(f"3M, {steps} steps", bpd_of(logp), nfe, time.perf_counter() - start))
    result = {"model": {"checkpoint": repo_relative(source), "step": step}, "num_images": len(images),
              "reference_tol": args.reference_tol, "reference_bpd": reference.mean().item(),
              "eps": eps, "rows": rows}
    if not math.isfinite(result["reference_bpd"]):
        raise SystemExit("the reference bits/dim is not finite")
    write_result(args, NAME, TITLE, result, render)


if __name__ == "__main__":
    main()
