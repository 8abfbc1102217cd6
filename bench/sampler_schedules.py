"""Which time-step schedule serves each sampler best at 10-20 NFE?

Data with a sharp closed-form score: a mixture of narrow Gaussians, whose exact noise
predictor (tests/oracles.py) stands in for a perfectly trained network, so the only error
left is the sampler's. Two data sets:

  ring   8 components on a circle of radius 0.7 in 2-D, std 0.03 each (sharp modes);
  cube   16 components at random corners of [-0.8, 0.8]^16, std 0.05 each (higher D).

Every sampler runs at about 10 and 20 network evaluations (``steps_for_nfe``) with each
schedule, on VP, sub-VP and VE, from the same x_T and noise (common random numbers), and
is scored by the sliced 2-Wasserstein distance between its samples and as many exact
draws from the data (sorted 1-D projections on 64 fixed random directions). The floor is
the same distance between two independent exact draws. A schedule's score for a sampler is
its distance divided by the best schedule's distance in that setting, averaged (geometric
mean) over NFE, SDE and data set; the lowest average wins.

    python bench/sampler_schedules.py            # the table in schedules.py: ~1 h on 2 busy cores
    python bench/sampler_schedules.py --samples 4000 --quick   # VP and VE, a few minutes
    python bench/sampler_schedules.py --samplers dpm_solver_sde  # one sampler's rows
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sde.testing import GaussianMixtureOracle  # noqa: E402  (tests/oracles.py)
from sde import samplers  # noqa: E402
from sde.sdes import SubVPSDE, VESDE, VPSDE  # noqa: E402

SCHEDULES = samplers.SCHEDULES
#: (label, sampler, options): every sampler; ode with its fixed-grid methods (dopri5 picks
#: its own steps, the schedule only sets where it reports).
CONFIGS = [
    ("ancestral", "ancestral", {}),
    ("ddim", "ddim", {}),
    ("ode euler", "ode", {"method": "euler"}),
    ("ode midpoint", "ode", {"method": "midpoint"}),
    ("ode rk4", "ode", {"method": "rk4"}),
    ("euler_maruyama", "euler_maruyama", {}),
    ("pc", "pc", {}),
    ("dpm_solver 2", "dpm_solver", {"order": 2}),
    ("dpm_solver 3", "dpm_solver", {"order": 3}),
    ("dpm_solver 3, lower_order_final=False", "dpm_solver", {"order": 3, "lower_order_final": False}),
    ("dpm_solver_sde 2", "dpm_solver_sde", {"order": 2}),
    ("unipc 2", "unipc", {"order": 2}),
    ("unipc 3", "unipc", {"order": 3}),
    ("unipc 2 bh1", "unipc", {"order": 2, "variant": "bh1"}),
    ("heun", "heun", {}),
]
NFES = (10, 20)


def ring(sde) -> GaussianMixtureOracle:
    angle = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
    means = 0.7 * torch.stack([angle.cos(), angle.sin()], 1)
    return GaussianMixtureOracle(sde, torch.ones(8), means, torch.full_like(means, 0.03))


def cube(sde) -> GaussianMixtureOracle:
    corners = torch.randint(0, 2, (16, 16), generator=torch.Generator().manual_seed(0))
    means = 0.8 * (2.0 * corners.double() - 1.0)
    return GaussianMixtureOracle(sde, torch.ones(16), means, torch.full_like(means, 0.05))


def sliced_w2(x: torch.Tensor, y: torch.Tensor, directions: torch.Tensor) -> float:
    """Sliced 2-Wasserstein distance of two equally sized samples (exact per projection)."""
    px, _ = torch.sort(x.double() @ directions.T, dim=0)
    py, _ = torch.sort(y.double() @ directions.T, dim=0)
    return float(((px - py) ** 2).mean().sqrt())


def run(n: int, quick: bool, configs: list) -> None:
    torch.set_num_threads(1)
    sdes = {"VP": VPSDE(), "subVP": SubVPSDE(), "VE": VESDE()}
    datasets = {"ring": ring, "cube": cube}
    if quick:
        sdes = {"VP": sdes["VP"], "VE": sdes["VE"]}
    # log relative distance per (config, schedule), summed over settings
    log_ratio = {label: {s: 0.0 for s in SCHEDULES} for label, _, _ in configs}
    settings = 0
    rows = []
    start = time.time()
    for data_name, make in datasets.items():
        for sde_name, sde in sdes.items():
            oracle = make(sde)
            dim = oracle.means.shape[1]
            directions = torch.randn(64, dim, generator=torch.Generator().manual_seed(1),
                                     dtype=torch.float64)
            directions = directions / directions.norm(dim=1, keepdim=True)
            exact = oracle.sample(n, torch.Generator().manual_seed(2))
            floor = sliced_w2(oracle.sample(n, torch.Generator().manual_seed(3)), exact, directions)
            x_T = sde.prior_sampling((n, dim), generator=torch.Generator().manual_seed(4))
            for nfe in NFES:
                settings += 1
                for label, name, options in configs:
                    steps = samplers.steps_for_nfe(name, nfe, **options)
                    distance = {}
                    for schedule in SCHEDULES:
                        x, info = samplers.sample(name, oracle, sde, (n, dim), steps=steps,
                                                  generator=torch.Generator().manual_seed(5),
                                                  x_T=x_T, schedule=schedule, disable=True,
                                                  **options)
                        distance[schedule] = sliced_w2(x, exact, directions)
                    best = min(distance.values())
                    for schedule in SCHEDULES:
                        log_ratio[label][schedule] += math.log(distance[schedule] / best)
                    rows.append((data_name, sde_name, nfe, label, info["nfe"], distance, floor))
                print(f"done: {data_name} {sde_name} NFE {nfe} ({time.time() - start:.0f} s)",
                      file=sys.stderr, flush=True)
    print(f"# sliced W2 to exact samples (n={n}; floor = two exact samples), "
          f"{time.time() - start:.0f} s\n")
    print("| data | SDE | NFE | sampler (NFE) | " + " | ".join(SCHEDULES) + " | floor |")
    print("|---|---|---|---|" + "---|" * (len(SCHEDULES) + 1))
    for data_name, sde_name, nfe, label, used, distance, floor in rows:
        best = min(distance, key=distance.get)
        cells = [f"**{distance[s]:.4f}**" if s == best else f"{distance[s]:.4f}" for s in SCHEDULES]
        print(f"| {data_name} | {sde_name} | {nfe} | {label} ({used}) | " + " | ".join(cells)
              + f" | {floor:.4f} |")
    print("\n# geometric-mean distance relative to the best schedule of each setting "
          f"({settings} settings)\n")
    print("| sampler | " + " | ".join(SCHEDULES) + " | best |")
    print("|---|" + "---|" * (len(SCHEDULES) + 1))
    for label, _, _ in configs:
        mean = {s: math.exp(v / settings) for s, v in log_ratio[label].items()}
        best = min(mean, key=mean.get)
        print(f"| {label} | " + " | ".join(f"{mean[s]:.2f}" for s in SCHEDULES) + f" | {best} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000, help="samples per run")
    parser.add_argument("--quick", action="store_true", help="VP and VE only")
    parser.add_argument("--samplers", nargs="+", default=None,
                        help="only these samplers' rows (default: all)")
    args = parser.parse_args()
    names = sorted({name for _, name, _ in CONFIGS})
    unknown = sorted(set(args.samplers or []) - set(names))
    if unknown:
        parser.error(f"unknown sampler(s) {unknown}; accepted: {', '.join(names)}")
    configs = [c for c in CONFIGS if args.samplers is None or c[1] in args.samplers]
    run(args.samples, args.quick, configs)


if __name__ == "__main__":
    main()
