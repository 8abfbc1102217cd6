"""Which time-step schedule serves each sampler best at 10-20 NFE? (The default schedules.)

Data with a sharp closed-form score: a mixture of narrow Gaussians, whose exact noise
predictor (``sde.testing.GaussianMixtureOracle``) stands in for a perfectly trained network,
so the only error left is the sampler's. Two data sets:

  ring   8 components on a circle of radius 0.7 in 2-D, std 0.03 each (sharp modes);
  cube   16 components at random corners of [-0.8, 0.8]^16, std 0.05 each (higher D).

Every sampler runs at about 10 and 20 network evaluations (``steps_for_nfe``) with each
schedule, on VP, sub-VP and VE, from the same x_T and noise (common random numbers), and
is scored by the sliced 2-Wasserstein distance between its samples and as many exact
draws from the data (sorted 1-D projections on 64 fixed random directions). The floor is
the same distance between two independent exact draws. A schedule's score for a sampler is
its distance divided by the best schedule's distance in that setting, averaged (geometric
mean) over NFE, SDE and data set; the lowest average wins. Each sampler's default schedule
(its ``SamplerSpec.schedule``) is the one this table picked. Writes
``bench/results/sampler_schedules.json``.

    python -m bench.sampler_schedules            # the protocol: ~1 h on 2 busy cores
    python -m bench.sampler_schedules --samples 4000 --quick   # VP and VE, a few minutes
    python -m bench.sampler_schedules --samplers dpm_solver_sde  # one sampler's rows
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from bench.common import add_write_options, format_reading, table, write_result
from sde import samplers
from sde.sdes import SubVPSDE, VESDE, VPSDE
from sde.testing import GaussianMixtureOracle

NAME, TITLE = "sampler_schedules", "Default schedules"
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


def run(n: int, quick: bool, configs: list) -> dict:
    """Every (data, SDE, NFE, sampler, schedule) distance, and the geometric-mean table."""
    torch.set_num_threads(1)
    sdes = {"VP": VPSDE(), "subVP": SubVPSDE(), "VE": VESDE()}
    datasets = {"ring": ring, "cube": cube}
    if quick:
        sdes = {"VP": sdes["VP"], "VE": sdes["VE"]}
    # log relative distance per (config, schedule), summed over settings
    log_ratio = {label: {s: 0.0 for s in SCHEDULES} for label, _, _ in configs}
    settings = 0
    distances = []
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
                    distances.append({"data": data_name, "sde": sde_name, "nfe_budget": nfe, "sampler": label,
                                      "nfe": info["nfe"], "distance": distance, "floor": floor})
                print(f"done: {data_name} {sde_name} NFE {nfe} ({time.time() - start:.0f} s)",
                      file=sys.stderr, flush=True)
    rows = []
    for label, name, options in configs:
        mean = {s: math.exp(v / settings) for s, v in log_ratio[label].items()}
        rows.append({"label": label, "sampler": name, "options": options, "geometric_mean": mean,
                     "best": min(mean, key=mean.get), "default": samplers.SAMPLERS[name].schedule})
    return {"samples": n, "settings": settings, "nfe_budgets": list(NFES), "sdes": list(sdes),
            "data": list(datasets), "schedules": list(SCHEDULES), "seconds": time.time() - start,
            "rows": rows, "distances": distances}


def render(result: dict) -> str:
    schedules = result["schedules"]
    rows = result["rows"]
    parts = [f"Exact noise predictors of two mixtures of narrow Gaussians (8 modes of std 0.03 on a "
             f"ring in 2-D; 16 modes of std 0.05 at corners of [-0.8, 0.8]^16), every sampler at about "
             f"{' and '.join(map(str, result['nfe_budgets']))} NFE on {', '.join(result['sdes'])} "
             f"({result['settings']} settings), scored by the sliced 2-Wasserstein distance of "
             f"{result['samples']:,} samples to exact draws. Geometric mean over the settings of the "
             "distance relative to the best schedule of each setting (1.00 = always the best):", "",
             table(["sampler"] + schedules + ["best", "default"],
                   [[row["label"]] + [f"**{row['geometric_mean'][s]:.2f}**" if s == row["best"]
                                      else f"{row['geometric_mean'][s]:.2f}" for s in schedules]
                    + [row["best"], row["default"]] for row in rows])]
    if result.get("note"):
        parts += ["", result["note"]]
    reading = []
    wins = {s: [row["label"] for row in rows if row["best"] == s] for s in schedules}
    never = [s for s in schedules if not wins[s]]
    line = ("Best schedule: " + "; ".join(f"`{s}` for {len(w)} of {len(rows)} rows" for s, w in wins.items() if w)
            + (f"; never {', '.join(f'`{s}`' for s in never)}." if never else "."))
    if "uniform" in never:
        line += (" Uniform in t spends most steps at high noise; Karras' rho = 7, tuned for images, puts many of "
                 "few levels near eps for these sharp modes.")
    reading.append(line)
    differing = [row for row in rows if row["default"] != row["best"]]
    if differing:
        reading.append("A sampler has one default for all its rows (the best product over them), so "
                       + "; ".join(f"`{row['label']}` takes `{row['default']}` "
                                   f"({row['geometric_mean'][row['default']]:.2f}, best `{row['best']}` "
                                   f"{row['geometric_mean'][row['best']]:.2f})" for row in differing) + ".")
    return "\n".join(parts) + "\n\n" + format_reading(reading)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000, help="samples per run")
    parser.add_argument("--quick", action="store_true", help="VP and VE only")
    parser.add_argument("--samplers", nargs="+", default=None,
                        help="only these samplers' rows (default: all)")
    add_write_options(parser)
    args = parser.parse_args()
    names = sorted({name for _, name, _ in CONFIGS})
    unknown = sorted(set(args.samplers or []) - set(names))
    if unknown:
        parser.error(f"unknown sampler(s) {unknown}; accepted: {', '.join(names)}")
    if args.samples < 2:
        parser.error("--samples must be >= 2")
    configs = [c for c in CONFIGS if args.samplers is None or c[1] in args.samplers]
    write_result(args, NAME, TITLE, run(args.samples, args.quick, configs), render)


if __name__ == "__main__":
    main()
