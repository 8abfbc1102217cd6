"""Does diffusers' third-order SDE-DPM-Solver++ converge? A closed-form check, and why
``bench/peer_samplers.py`` runs diffusers' SDE-DPM-Solver++ at its default order 2 only.

    python bench/diffusers_sde_order3.py            # seconds; appends its table to BENCHMARKS.md

``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3)`` (diffusers
0.42.1) samples 1-D Gaussian data N(0.5, 0.5^2) with the exact eps of that data, so the only
error is the solver's. The sample std should approach the data's 0.5 as the steps grow. The
script prints the error of the std at 10 to 160 steps for order 2, for order 3 as shipped,
and for order 3 with the sign of one constant changed, as explained below.

The third-order update is x_t = ... + alpha_t (k1 D0 + k2 D1 + k3 D2) + noise, with D1 ~ h D'
and D2 = (D1_0 - D1_1) / (r0 + r1) ~ h^2 D'' / 2. Integrating the quadratic Taylor term of
the data prediction against the SDE's kernel 2 e^{2(u - h)} on [0, h] gives a D2 coefficient
that vanishes like h as h -> 0: k3 = (2/3) h + O(h^2). k-diffusion's
``sample_dpmpp_3m_sde`` uses -phi_3 = h/3 + O(h^2) (half of that, the same convention as both
libraries' ODE third order). diffusers computes

    k3 = (1 - e^{-2h} - 2h) / (2h)^2 - 0.5 = -1 + h/3 + O(h^2),

which is k-diffusion's coefficient minus 1: an O(1) weight on the O(h^2) term D2, so every
step makes an O(h^2) error, and the recursion is not stable either. With "+ 0.5" the
coefficient is k-diffusion's ("sign-fixed" below). Measured (BENCHMARKS.md): as shipped, the
std error does not go to zero with the steps (0.09 at 80, 0.03 at 160 and 320, 0.43 at 640),
while the sign-fixed update converges, faster than order 2, to the Monte-Carlo level.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import peers  # noqa: E402
from bench.common import publish  # noqa: E402
from sde.sdes import VPSDE  # noqa: E402

MEAN, STD = 0.5, 0.5


def sign_fixed_scheduler_class(diffusers):
    """DPMSolverMultistepScheduler whose sde-dpmsolver++ third-order step has k3 = k-diffusion's
    -phi_3 = (1 - e^{-2h} - 2h) / (2h)^2 + 0.5 (the module docstring); nothing else differs."""

    class SignFixed(diffusers.DPMSolverMultistepScheduler):
        def multistep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None,
                                                    noise=None, **kwargs):
            x_t = super().multistep_dpm_solver_third_order_update(
                model_output_list, *args, sample=sample, noise=noise, **kwargs)
            # Shipped k3 minus the fixed k3 is -1: add alpha_t D2 back.
            index = self.step_index
            sigmas = [self._sigma_to_alpha_sigma_t(self.sigmas[index + 1 - k]) for k in range(4)]
            log_snr = [torch.log(alpha) - torch.log(sigma) for alpha, sigma in sigmas]
            h, h0, h1 = (log_snr[0] - log_snr[1], log_snr[1] - log_snr[2],
                         log_snr[2] - log_snr[3])
            m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
            r0, r1 = h0 / h, h1 / h
            d2 = ((m0 - m1) / r0 - (m1 - m2) / r1) / (r0 + r1)
            return x_t + sigmas[0][0] * d2

    return SignFixed


def std_error(scheduler, steps: int, samples: int, seed: int) -> float:
    """Sample std minus the data's after ``steps`` steps with the exact eps of N(MEAN, STD^2)."""
    alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 1, generator=generator, dtype=torch.float64)
    for timestep in scheduler.timesteps.tolist():
        alpha, sigma = alphas_cumprod[timestep].sqrt(), (1 - alphas_cumprod[timestep]).sqrt()
        eps = sigma * (x - alpha * MEAN) / (alpha ** 2 * STD ** 2 + sigma ** 2)
        x = scheduler.step(eps, timestep, x, generator=generator).prev_sample
    return float(x.std()) - STD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40, 80, 160, 320, 640])
    parser.add_argument("--samples", type=int, default=400_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-append", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    if min(args.steps) < 4:
        parser.error("--steps must be >= 4 (the third-order update needs three earlier levels)")
    if args.samples < 2:
        parser.error("--samples must be >= 2")
    diffusers = peers.require_diffusers()
    sde = VPSDE()  # its DDPM table: Ho et al.'s linspace(1e-4, 0.02, 1000)
    variants = {"order 2": (diffusers.DPMSolverMultistepScheduler, 2),
                "order 3, as shipped": (diffusers.DPMSolverMultistepScheduler, 3),
                "order 3, sign-fixed": (sign_fixed_scheduler_class(diffusers), 3)}
    lines = ["| steps | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    for steps in args.steps:
        errors = []
        for cls, order in variants.values():
            scheduler = cls(num_train_timesteps=sde.N, trained_betas=sde.betas.numpy(),
                            solver_order=order,
                            algorithm_type="sde-dpmsolver++", prediction_type="epsilon",
                            timestep_spacing="linspace")
            errors.append(std_error(scheduler, steps, args.samples, args.seed))
        lines.append(f"| {steps} | " + " | ".join(f"{error:+.4f}" for error in errors) + " |")
        print(lines[-1], flush=True)
    monte_carlo = STD / (2 * args.samples) ** 0.5
    table = "\n".join(
        [f"diffusers {diffusers.__version__} DPMSolverMultistepScheduler(sde-dpmsolver++), "
         f"'linspace' timesteps, 1-D data N({MEAN}, {STD}^2) with its exact eps; sample std minus "
         f"{STD} over {args.samples} samples (Monte-Carlo standard error {monte_carlo:.4f}), "
         f"seed {args.seed}.", ""] + lines)
    publish(args, "diffusers' third-order SDE-DPM-Solver++ on Gaussian data", table)


if __name__ == "__main__":
    main()
