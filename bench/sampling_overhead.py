"""The cost of each sampler's own bookkeeping: wall time of sampling a batch over the time of
the same number of bare network evaluations on that batch.

    python -m bench.sampling_overhead --nfe 10 20 --rounds 3 --batch-size 64
    python -m bench.sampling_overhead --checkpoint "" --batch-size 20 --rounds 2 --no-write  # quick

For every registered sampler (``sde.samplers.available()``; the adaptive ``ode`` by its
fixed-step methods, and the variants of ``bench.sampler_variants``) at each
``--nfe`` budget (``steps_for_nfe``: the most steps that fit), each round times

* the sampler: ``samplers.sample`` of a ``--batch-size`` batch from per-image generators
  (as ``sde.generation.generate`` draws), the network wrapped to count its evaluations;
* the baseline: NFE back-to-back evaluations of the network alone on a batch of the same
  shape, NFE being the counted number,

in alternating order from round to round, under ``torch.inference_mode``. The overhead is
the median over rounds of sampler time / baseline time (1.00: all the time is the network).
The counted NFE must equal ``nfe_for_steps`` (the registry's nominal count); a mismatch is
flagged in the table. Writes ``bench/results/sampling_overhead.json``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.common import (add_run_options, apply_threads, footnotes, format_reading, load_config, model_text,
                          repo_relative, table, write_result)
from bench.sampler_variants import sampler_variants, variant_label
from sde import samplers
from sde.data import sample_shape
from sde.generation import sample_generators
from sde.inference import load_ema_model
from sde.models import create_model
from sde.network import CountedModel
from sde.sdes import create_sde

NAME, TITLE = "sampling_overhead", "Sampler overhead over bare network evaluations"
#: The time the baseline evaluations are made at (any t in (0, 1]: the cost does not depend on it).
BASELINE_TIME = 0.5
#: Warm-up steps per sampler (code paths, allocator) before the timed rounds.
WARMUP_STEPS = 2


def load_network(config, checkpoint: str) -> tuple[torch.nn.Module, dict]:
    """The EMA network of ``checkpoint``, or a randomly initialised one when it is empty."""
    if not checkpoint:
        torch.manual_seed(0)
        return create_model(config).eval().requires_grad_(False), {"checkpoint": "randomly initialised network"}
    model, source, step = load_ema_model(config, "", torch.device("cpu"), checkpoint)
    return model, {"checkpoint": repo_relative(source), "step": step}


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
    print(f"{source['checkpoint']}; batch {args.batch_size}, {len(plan)} sampler settings, {args.rounds} rounds, "
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

    rows = []
    for entry in plan:
        counted = sorted(entry["counted"])
        rows.append({"label": entry["label"], "name": entry["name"], "options": entry["options"],
                     "budget": entry["budget"], "steps": entry["steps"], "nfe_counted": counted,
                     "nfe_nominal": entry["nominal"], "sampler_ms": 1e3 * statistics.median(entry["sampler_s"]),
                     "baseline_ms": 1e3 * statistics.median(entry["baseline_s"]),
                     "ratio": statistics.median(entry["ratio"]), "round_ratios": entry["ratio"]})
    result = {"model": source, "batch_size": args.batch_size, "rounds": args.rounds, "rows": rows}
    write_result(args, NAME, TITLE, result, render)


def _table(rows: list[tuple[dict, str]]) -> str:
    """sampler / (NFE x one evaluation) per sampler (rows, with the marker of the run they come
    from) and NFE budget (columns: steps, ratio)."""
    budgets = sorted({row["budget"] for row, _ in rows})
    cells: dict[str, dict[int, dict]] = {}
    for row, marker in rows:
        cells.setdefault(f"`{row['label']}`{marker}", {})[row["budget"]] = row
    header = ["sampler"]
    for budget in budgets:
        header += [f"{budget} NFE: steps", "ratio"]
    body = []
    for label, by_budget in cells.items():
        line = [label]
        for budget in budgets:
            row = by_budget.get(budget)
            mismatch = "" if row is None or row["nfe_counted"] == [row["nfe_nominal"]] else " (NFE MISMATCH)"
            line += ["", ""] if row is None else [row["steps"], f"{row['ratio']:.3f}{mismatch}"]
        body.append(line)
    return table(header, body)


def _describe(result: dict) -> str:
    model = model_text(result["model"])
    return (f"{model[:1].upper() + model[1:]}, batch {result['batch_size']}, medians of {result['rounds']} "
            "interleaved rounds")


def render(result: dict) -> str:
    supplements = result.get("supplements", [])
    markers, notes = footnotes([{**part, "note": _describe(part)} for part in supplements])
    marked = [(row, "") for row in result["rows"]] + [(row, marker) for part, marker in zip(supplements, markers)
                                                      for row in part["rows"]]
    parts = [_describe(result) + ". Wall time of a sampler over the time of as many bare network evaluations as "
             "it counted (1.000: all the time is the network)"
             + ("; a marked row comes from the run of its footnote:" if supplements else ":"), "",
             _table(marked)]
    if notes:
        parts += [""] + notes
    reading = []
    for title, part in [("This run", result)] + [(f"Run{marker}", part) for marker, part in zip(markers, supplements)]:
        ratios = sorted(row["ratio"] for row in part["rows"])
        worst = max(part["rows"], key=lambda row: row["ratio"])
        mismatches = [row["label"] for row in part["rows"] if row["nfe_counted"] != [row["nfe_nominal"]]]
        line = (f"{title}: median ratio {statistics.median(ratios):.3f} over {len(ratios)} settings, from "
                f"{ratios[0]:.3f} to {ratios[-1]:.3f} (worst `{worst['label']}` at {worst['steps']} steps); "
                + ("counted NFE = nominal everywhere." if not mismatches
                   else f"counted NFE differs from nominal for {', '.join(mismatches)}."))
        spreads = [max(row["round_ratios"]) - min(row["round_ratios"]) for row in part["rows"]
                   if len(row.get("round_ratios", [])) > 1]
        if spreads:
            line += (f" A setting's ratio moved by {statistics.median(spreads):.3f} (median) between rounds: "
                     "differences below that are noise.")
        reading.append(line)
    return "\n".join(parts) + "\n\n" + format_reading(reading)


if __name__ == "__main__":
    main()
