"""Can a fixed-step multistep integrator give ODE bits/dim at one network evaluation per step?

    python -m bench.investigations.likelihood_multistep        # the released model, train5k
    python -m bench.investigations.likelihood_multistep --config configs/mnist_vp_release_lw.py \
        --checkpoint release/mnist_vp_release_lw.safetensors --steps 50 60

The toolkit's likelihood (``sde.likelihood.ode_log_likelihood``) integrates the augmented
probability-flow ODE with adaptive dopri5: five or six network evaluations per step. A
multistep method pays one per step, reusing the denoised estimates of earlier steps. Here the
state x follows a third-order exponential multistep integrator in the log-SNR lambda (the
multistep DPM-Solver++ of Lu et al. 2022b, eq. 9), run from the data (lambda(eps)) to the
prior (lambda(T)). With x~ = x / alpha, h = lambda_next - lambda and x0_hat = (x - sigma
eps_theta) / alpha, the exact step is x~_next = e^(-h) x~ + int_0^h e^(tau - h) x0_hat(lambda +
tau) dtau; x0_hat's Taylor polynomial m + tau m' + tau^2 m''/2 integrates to

    x~_next = e^(-h) x~ + (1 - e^(-h)) m + phi_2 h m' - phi_3 h^2 m'',
    phi_2 = (e^(-h) - 1) / h + 1,  phi_3 = phi_2 / h - 1/2,

where the last three points give h m' ~ D_1 and h^2 m'' ~ 2 D_2 (D_2 the second divided
difference as k-diffusion's ``sample_dpmpp_3m_sde`` forms it, which weighs it by phi_3 alone
and so is of second order).
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
from pathlib import Path

import torch

from bench.common import (add_run_options, apply_threads, format_reading, load_config, model_text, repo_relative,
                          table, write_result)
from sde import likelihood
from sde.data import evaluation_subset, load_dataset, uint8_to_float
from sde.inference import load_ema_model
from sde.likelihood.common import counted_network
from sde.sdes import VPSDE, create_sde

NAME, TITLE = "likelihood_multistep", "Likelihood by a fixed-step multistep integrator"
Tensor = torch.Tensor


def multistep_log_likelihood(model, sde, x: Tensor, probe: Tensor, *, eps: float, steps: int) -> tuple[Tensor, int]:
    """log p_eps(x) [B] by the third-order exponential multistep for x and the trapezoid for
    delta (module docstring); returns it and the network evaluations."""
    counted, _ = counted_network(model, x)

    def eps_and_divergence(state: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """eps_theta and its Hutchinson divergence v^T (d eps / dx) v, one vector-Jacobian product."""
        with torch.enable_grad():
            x_in = state.detach().to(counted.dtype).requires_grad_(True)
            eps_hat = counted(x_in, t)
            (vjp,) = torch.autograd.grad(eps_hat, x_in, probe.to(eps_hat.dtype))
        return eps_hat.detach().double(), (vjp.double() * probe).flatten(1).sum(1)

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
            eps_hat, div_eps = eps_and_divergence(state, t[k].expand(batch))
            new_rate = sigma[k] ** 2 * dims - sigma[k] * div_eps  # d delta / d lambda on VP
            if rate is not None:
                delta = delta + 0.5 * (rate + new_rate) * (lam[k] - lam[k - 1])
            rate = new_rate
            if k == steps:
                break
            denoised = denoised[-2:] + [(state - sigma[k] * eps_hat) / alpha[k]]
            h = lam[k + 1] - lam[k]
            phi_2 = torch.expm1(-h) / h + 1.0
            scaled = torch.exp(-h) * state / alpha[k] - torch.expm1(-h) * denoised[-1]
            if len(denoised) >= 3:
                r0, r1 = (lam[k] - lam[k - 1]) / h, (lam[k - 1] - lam[k - 2]) / h
                d1_0 = (denoised[-1] - denoised[-2]) / r0
                d1_1 = (denoised[-2] - denoised[-3]) / r1
                d_1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d_2 = (d1_0 - d1_1) / (r0 + r1)
                scaled = scaled + phi_2 * d_1 - 2.0 * (phi_2 / h - 0.5) * d_2
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
    if min(args.steps) < 1:
        parser.error(f"--steps must be >= 1, got {min(args.steps)}")
    if args.num_images < 1:
        parser.error(f"--num-images must be >= 1, got {args.num_images}")
    if not 0 <= args.seed < 2 ** 63:
        parser.error(f"--seed must lie in [0, 2^63), got {args.seed}")
    if not 0 < args.reference_tol <= 1e-4:
        parser.error(f"--reference-tol must lie in (0, 1e-4] (a reference tighter than the default's 1e-4), "
                     f"got {args.reference_tol}")
    if not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint {args.checkpoint} does not exist")
    apply_threads(args)
    config = load_config(args.config)
    config.data.download = False
    sde = create_sde(config)
    if not isinstance(sde, VPSDE):
        parser.error(f"the multistep update assumes the VP SDE; {args.config} has {type(sde).__name__}")
    model, source, step = load_ema_model(config, "", torch.device("cpu"), args.checkpoint)
    heldout = load_dataset(config, "train5k")
    if args.num_images > len(heldout[0]):
        parser.error(f"--num-images must be at most the {len(heldout[0])} train5k images, got {args.num_images}")
    images, _ = evaluation_subset(*heldout, args.num_images, seed=args.seed)
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
        rows.append(row(f"multistep, {steps} steps", bpd_of(logp), nfe, time.perf_counter() - start))
    result = {"model": {"checkpoint": repo_relative(source), "step": step}, "num_images": len(images),
              "reference_tol": args.reference_tol, "reference_bpd": reference.mean().item(),
              "eps": eps, "rows": rows}
    if not math.isfinite(result["reference_bpd"]):
        raise SystemExit("the reference bits/dim is not finite")
    write_result(args, NAME, TITLE, result, render)


if __name__ == "__main__":
    main()
