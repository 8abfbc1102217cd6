"""The cost of each sampler's own bookkeeping: wall time of sampling a batch over the time of
the same number of bare network evaluations on that batch.

    python bench/sampling_overhead.py --checkpoint release/mnist_vp_release.safetensors
    python bench/sampling_overhead.py --checkpoint "" --batch-size 20 --rounds 2 --no-append  # quick

For every registered sampler (``sde.samplers.available()``; the adaptive ``ode`` by its
fixed-step methods, and DPM-Solver of order 3, ``bench/sampler_variants.py``) at each
``--nfe`` budget (``steps_for_nfe``: the most steps that fit), each round times

* the sampler: ``samplers.sample`` of a ``--batch-size`` batch from per-image generators
  (as ``sde.run_sample.generate`` draws), the network wrapped to count its evaluations;
* the baseline: NFE back-to-back evaluations of the network alone on a batch of the same
  shape, NFE being the counted number,

in alternating order from round to round, under ``torch.inference_mode``. The overhead is
the median over rounds of sampler time / baseline time (1.00: all the time is the network;
goal <= 1.05). The counted NFE must equal ``nfe_for_steps`` (the registry's nominal count);
a mismatch is flagged in the table. The table is appended to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import add_run_options, apply_threads, load_config, publish  # noqa: E402
from sde.network import CountedModel  # noqa: E402
from bench.sampler_variants import sampler_variants, variant_label  # noqa: E402
from sde import samplers  # noqa: E402
from sde.data import sample_shape  # noqa: E402
from sde.generation import sample_generators  # noqa: E402
from sde.inference import load_ema_model  # noqa: E402
from sde.models import create_model  # noqa: E402
from sde.sdes import create_sde  # noqa: E402

GOAL_RATIO = 1.05
#: The time the baseline evaluations are made at (any t in (0, 1]: the cost does not depend on it).
BASELINE_TIME = 0.5
#: Warm-up steps per sampler (code paths, allocator) before the timed rounds.
WARMUP_STEPS = 2


def load_network(config, checkpoint: str) -> tuple[torch.nn.Module, str]:
    """The EMA network of ``checkpoint``, or a randomly initialised one when it is empty."""
    if not checkpoint:
        torch.manual_seed(0)
        return create_model(config).eval().requires_grad_(False), "randomly initialised network"
    model, source, step = load_ema_model(config, "", torch.device("cpu"), checkpoint)
    return model, f"{source} (step {step})"


def time_sampler(model, sde, shape, name: str, steps: int, options: dict, seed: int) -> tuple[float, int]:
    """(seconds, counted NFE) of one ``samplers.sample`` of a batch."""
    counted = CountedModel(model)
    generators = sample_generators(seed, 0, shape[0], torch.device("cpu"))
    start = time.perf_counter()
    samplers.sample(name, counted, sde, shape, steps=steps, generator=generators, disable=True, **options)
    return time.perf_counter() - start, counted.nfe


def time_evaluations(model, x: torch.Tensor, t: torch.Tensor, count: int) -> float:
    """Seconds of ``count`` back-to-back network evaluations on ``x``."""
    start = time.perf_counter()
    for _ in range(count):
        model(x, t)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_vp_release.py")
    parser.add_argument("--checkpoint", default="release/mnist_vp_release.safetensors",
                        help=".safetensors weights or a .pt checkpoint; '' for a randomly initialised network")
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samplers", nargs="+", default=None, help="default: every registered sampler")
    parser.add_argument("--seed", type=int, default=0)
    add_run_options(parser)
    args = parser.parse_args()
    names = args.samplers or samplers.available()
    unknown = sorted(set(names) - set(samplers.available()))
    if unknown:
        parser.error(f"unknown sampler(s) {unknown}; accepted: {', '.join(samplers.available())}")
    if args.rounds < 1 or args.batch_size < 1:
        parser.error("--rounds and --batch-size must be >= 1")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint {args.checkpoint} does not exist")
    apply_threads(args)

    config = load_config(args.config)
    sde = create_sde(config)
    model, source = load_network(config, args.checkpoint)
    shape = sample_shape(config, args.batch_size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    t = torch.full((args.batch_size,), BASELINE_TIME)

    plan = []
    for budget in args.nfe:
        for name in names:
            for options in sampler_variants(name):
                try:
                    steps = samplers.steps_for_nfe(name, budget, **options)
                except ValueError:  # needs more than the budget even for one step
                    continue
                plan.append({"budget": budget, "name": name, "options": options, "steps": steps,
                             "label": variant_label(name, options),
                             "nominal": samplers.nfe_for_steps(name, steps, **options),
                             "sampler_s": [], "baseline_s": [], "ratio": [], "counted": set()})
    print(f"{source}; batch {args.batch_size}, {len(plan)} sampler settings, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads", flush=True)

    with torch.inference_mode():
        time_evaluations(model, x, t, WARMUP_STEPS)
        for name, options in {(p["name"], tuple(p["options"].items())) for p in plan}:
            time_sampler(model, sde, shape, name, WARMUP_STEPS, dict(options), args.seed)
        for round_index in range(args.rounds):
            for entry in plan:
                def sampler() -> float:
                    seconds, nfe = time_sampler(model, sde, shape, entry["name"], entry["steps"],
                                                entry["options"], args.seed)
                    entry["counted"].add(nfe)
                    return seconds

                if round_index % 2 == 0:
                    sampler_s = sampler()
                    baseline_s = time_evaluations(model, x, t, max(entry["counted"]))
                else:
                    baseline_s = time_evaluations(model, x, t, max(entry["counted"]))
                    sampler_s = sampler()
                entry["sampler_s"].append(sampler_s)
                entry["baseline_s"].append(baseline_s)
                entry["ratio"].append(sampler_s / baseline_s)
            print(f"round {round_index + 1}/{args.rounds}: worst ratio "
                  f"{max(entry['ratio'][-1] for entry in plan):.3f}", flush=True)

    lines = [f"{source}; batch {args.batch_size}; median of {args.rounds} interleaved rounds.", "",
             "| sampler | steps | NFE counted (nominal) | sampler ms | NFE x eval ms | eval ms | "
             "sampler / (NFE x eval) |", "|---|---|---|---|---|---|---|"]
    mismatches, worst = [], None
    for entry in plan:
        counted = sorted(entry["counted"])
        check = "" if counted == [entry["nominal"]] else " MISMATCH"
        if check:
            mismatches.append(entry["label"])
        ratio = statistics.median(entry["ratio"])
        baseline = statistics.median(entry["baseline_s"])
        if worst is None or ratio > worst[0]:
            worst = (ratio, entry)
        lines.append(f"| {entry['label']} | {entry['steps']} | {'/'.join(map(str, counted))} "
                     f"({entry['nominal']}){check} | {1e3 * statistics.median(entry['sampler_s']):.0f} | "
                     f"{1e3 * baseline:.0f} | {1e3 * baseline / counted[-1]:.1f} | {ratio:.3f} |")
    ratio, entry = worst
    lines += ["", f"Worst overhead: {entry['label']} at {entry['steps']} steps, {ratio:.3f} "
                  f"(goal <= {GOAL_RATIO}: {'met' if ratio <= GOAL_RATIO else 'not met'}). "
                  f"Counted NFE = nominal: {'all' if not mismatches else 'NOT for ' + ', '.join(mismatches)}."]
    table = "\n".join(lines)
    publish(args, "Sampler overhead over bare network evaluations", table)


if __name__ == "__main__":
    main()
