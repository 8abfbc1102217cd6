"""How long until bits/dim can be trusted? Probability-flow ODE likelihoods side by side.

    python bench/likelihood_speed.py --workdir runs/mnist_vp              # a trained run
    python bench/likelihood_speed.py --config configs/mnist_vp.py --train-steps 300

On one model, one batch of held-out images, ONE draw of dequantization noise and ONE
Rademacher probe per image (shared by every method, so the comparison is deterministic):

  (a) reference: a float64 copy of the network, dopri5 at rtol = atol = --reference-tol,
      in both integration variables (their difference is printed: the reference's own error);
  (b) the protocol users run today, written as score_sde's likelihood.py does it: scipy
      solve_ivp RK45 at rtol = atol = 1e-5 in t, numpy round trips on every evaluation;
  (c) sde.likelihood.ode_log_likelihood with its defaults.

It prints, for (b) and (c), wall time (median of ``--rounds`` interleaved runs), NFE and
|bits/dim - reference| (of the batch mean, and the largest per image), the wall-time ratio
(b)/(c), and a table of error against cost for several tolerances in both integration
variables ("t" and "log_snr"), from which sde.likelihood's defaults are chosen. Wall times
drift on shared machines; the ratios are measured side by side in one run.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import ml_collections
import numpy as np
import torch
from scipy.integrate import solve_ivp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_run_options, append_to_benchmarks, apply_threads, command_line  # noqa: E402
from sde import likelihood  # noqa: E402
from sde.data import EmbeddedMNISTWarning, evaluation_subset, load_dataset, uint8_to_float  # noqa: E402
from sde.inference import load_ema_model  # noqa: E402
from sde.losses import LossConfig, make_loss_fn  # noqa: E402
from sde.models import create_model  # noqa: E402
from sde.sdes import SDE, broadcast_to, create_sde  # noqa: E402

Tensor = torch.Tensor
TABLE_TOLERANCES = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
TABLE_METHODS = ("dopri5", "bosh3")
SCORE_SDE_TOLERANCE = 1e-5
TARGET_SPEEDUP, TARGET_ERROR_BPD = 3.0, 0.01


# ---- the model --------------------------------------------------------------------------
def load_workdir_model(workdir: str, device: torch.device) -> tuple[torch.nn.Module, ml_collections.ConfigDict, str]:
    """The EMA network of a toolkit run, with the run's own config.json."""
    config_path = Path(workdir) / "config.json"
    if not config_path.is_file():
        raise SystemExit(f"error: {config_path} not found; --workdir must be a toolkit run directory")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    model, source, step = load_ema_model(config, workdir, device)
    return model, config, f"{source} (step {step})"


def load_config_file(path: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def quickly_trained_model(config: ml_collections.ConfigDict, sde: SDE, images: Tensor, steps: int,
                          seed: int, device: torch.device) -> torch.nn.Module:
    """A fresh network from the config after ``steps`` Adam steps of the configured loss.

    Untrained, the U-Net's zero-initialised output makes eps = 0 and the flow linear,
    which says nothing about cost; a few hundred steps give a score with real structure.
    """
    torch.manual_seed(seed)
    model = create_model(config).to(device)
    training = config.training
    loss_fn = make_loss_fn(sde, LossConfig(continuous=training.continuous,
                                           likelihood_weighting=training.likelihood_weighting,
                                           importance_sampling=training.importance_sampling,
                                           eps=training.eps))
    optimizer = torch.optim.Adam(model.parameters(), lr=training.lr)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        index = torch.randint(0, len(images), (training.batch_size,), generator=generator)
        x0 = uint8_to_float(images[index], dequantize=False).to(device)
        loss = loss_fn(model, x0, generator=None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 50 == 0:
            print(f"  train step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
    return model.eval().requires_grad_(False)


# ---- (b): the score_sde protocol --------------------------------------------------------
def score_sde_style_log_likelihood(model: torch.nn.Module, sde: SDE, x: Tensor, probe: Tensor, *,
                                   eps: float, rtol: float, atol: float) -> tuple[Tensor, int]:
    """As Song et al.'s released likelihood.py: the state [x, delta-logp] flattened into one
    float64 numpy vector, scipy RK45 in t, and every evaluation converting numpy -> torch
    (float32, on the device) -> numpy; Hutchinson with the given fixed probe."""
    shape, batch, device = x.shape, x.shape[0], x.device
    nfe = 0

    def ode_func(t: float, state: np.ndarray) -> np.ndarray:
        nonlocal nfe
        nfe += 1
        sample = torch.from_numpy(state[:-batch]).reshape(shape).to(device, torch.float32)
        times = torch.full((batch,), t, device=device, dtype=torch.float32)
        with torch.enable_grad():
            sample.requires_grad_(True)
            drift = (broadcast_to(sde.drift_coef(times), sample) * sample
                     + broadcast_to(0.5 * sde.diffusion_sq(times) / sde.sigma(times), sample)
                     * model(sample, times))
            (vjp,) = torch.autograd.grad((drift * probe).sum(), sample)
        divergence = (vjp * probe).flatten(1).sum(1)
        return np.concatenate([drift.detach().cpu().numpy().reshape(-1),
                               divergence.cpu().numpy().astype(np.float64)])

    initial = np.concatenate([x.cpu().numpy().reshape(-1), np.zeros(batch)])
    solution = solve_ivp(ode_func, (eps, sde.T), initial, rtol=rtol, atol=atol, method="RK45")
    x_T = torch.from_numpy(solution.y[:-batch, -1]).reshape(shape)
    delta_logp = torch.from_numpy(solution.y[-batch:, -1])
    return sde.prior_logp(x_T) + delta_logp, nfe


# ---- measurement ------------------------------------------------------------------------
def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="toolkit run directory (config.json + checkpoints/)")
    source.add_argument("--config", help="configs/*.py: build a fresh network (see --train-steps)")
    parser.add_argument("--train-steps", type=int, default=300,
                        help="with --config: Adam steps before measuring (default 300)")
    parser.add_argument("--split", default="train5k", help="held-out split (default train5k)")
    parser.add_argument("--data-dir", default="", help="override config.data.data_dir")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eps", type=float, default=likelihood.DEFAULT_EPS)
    parser.add_argument("--reference-tol", type=float, default=1e-7)
    parser.add_argument("--tolerances", type=float, nargs="*", default=list(TABLE_TOLERANCES))
    parser.add_argument("--methods", nargs="*", default=list(TABLE_METHODS),
                        choices=likelihood.ADAPTIVE_METHODS)
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved timing rounds of (b) and (c); their medians are compared")
    parser.add_argument("--output", default="", help="also write the results as JSON here")
    add_run_options(parser)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    apply_threads(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    if args.workdir:
        model, config, description = load_workdir_model(args.workdir, device)
    else:
        config = load_config_file(args.config)
    if args.data_dir:
        config.data.data_dir = args.data_dir
    config.data.download = False
    sde = create_sde(config)
    if not args.workdir:
        train_images, _ = load_dataset(config, "test" if args.split != "test" else "train")
        print(f"training a fresh {config.model.name} for {args.train_steps} steps ...", flush=True)
        model = quickly_trained_model(config, sde, train_images, args.train_steps, args.seed, device)
        description = f"{args.config}, quickly trained for {args.train_steps} steps"

    with warnings.catch_warnings():  # never measure "held-out" bits/dim on a fallback split
        warnings.simplefilter("error", EmbeddedMNISTWarning)
        images, _ = evaluation_subset(*load_dataset(config, args.split), args.num_images, seed=args.seed)
    dims = images[0].numel()
    generator = torch.Generator().manual_seed(args.seed)
    x = uint8_to_float(images, dequantize=True, generator=generator).to(device)
    probe = (2.0 * torch.randint(0, 2, x.shape, generator=generator).double() - 1.0).to(device)
    print(f"model: {description}; sde: {sde!r}; {len(images)} {config.data.dataset} "
          f"{args.split!r} images, D = {dims}, eps = {args.eps}, device {device}", flush=True)

    def to_bpd(logp: Tensor) -> Tensor:
        return likelihood.dequantized_bits_per_dim(logp.double().cpu(), dims)

    def toolkit(network, **options):
        (logp, info), seconds = timed(likelihood.ode_log_likelihood, network, sde, x, probe=probe,
                                      eps=args.eps, **options)
        return to_bpd(logp), info["nfe"], seconds

    # (a) reference: float64 network, tight tolerance, both variables
    model64 = copy.deepcopy(model).double()
    references = {variable: toolkit(model64, variable=variable, rtol=args.reference_tol,
                                    atol=args.reference_tol)
                  for variable in likelihood.VARIABLES}
    for variable, (bpd, nfe, seconds) in references.items():
        print(f"(a) reference [{variable}]: {bpd.mean():.5f} bits/dim, NFE {nfe}, {seconds:.1f} s", flush=True)
    reference = torch.stack([bpd for bpd, _, _ in references.values()]).mean(0)
    reference_spread = (references["t"][0] - references["log_snr"][0]).abs().max().item()
    print(f"    reference = {reference.mean():.5f} bits/dim; t vs log_snr differ by at most "
          f"{reference_spread:.1e} bits/dim per image", flush=True)

    def row(name: str, bpd: Tensor, nfe: int, seconds: float) -> dict:
        result = {"method": name, "nfe": nfe, "seconds": seconds, "bpd": bpd.mean().item(),
                  "error_mean_bpd": abs(bpd.mean() - reference.mean()).item(),
                  "error_max_image_bpd": (bpd - reference).abs().max().item()}
        print(f"{name:<34} {seconds:8.1f} s  NFE {nfe:5d}  |d bpd| {result['error_mean_bpd']:.1e} "
              f"(worst image {result['error_max_image_bpd']:.1e})", flush=True)
        return result

    # (b) score_sde protocol and (c) the toolkit default, side by side: interleaved rounds and
    # median wall times, since one run of each drifts with the machine's load (the results
    # themselves are deterministic: same noise, same probe)
    baseline_seconds, default_seconds = [], []
    for _ in range(args.rounds):
        (logp, baseline_nfe), seconds = timed(score_sde_style_log_likelihood, model, sde, x.float(),
                                              probe.float(), eps=args.eps, rtol=SCORE_SDE_TOLERANCE,
                                              atol=SCORE_SDE_TOLERANCE)
        baseline_seconds.append(seconds)
        default_bpd, default_nfe, seconds = toolkit(model)
        default_seconds.append(seconds)
    baseline = row("(b) scipy RK45 1e-5 in t (score_sde)", to_bpd(logp), baseline_nfe,
                   statistics.median(baseline_seconds))
    default = row(f"(c) toolkit default ({likelihood.DEFAULT_VARIABLE}, "
                  f"{likelihood.DEFAULT_RTOL:g})", default_bpd, default_nfe,
                  statistics.median(default_seconds))
    speedup = baseline["seconds"] / default["seconds"]
    round_ratios = ", ".join(f"{b / c:.2f}" for b, c in zip(baseline_seconds, default_seconds))
    print(f"(b)/(c) per round: {round_ratios}", flush=True)
    verdict = "meets" if speedup >= TARGET_SPEEDUP and default["error_mean_bpd"] <= TARGET_ERROR_BPD else "MISSES"
    print(f"wall-time ratio (b)/(c) = {speedup:.2f}x; {verdict} the target (>= {TARGET_SPEEDUP:g}x, "
          f"<= {TARGET_ERROR_BPD} bits/dim)", flush=True)

    # error against cost
    lines = ["| solver | variable | rtol = atol | NFE | seconds | abs error of mean bpd | worst image |",
             "|---|---|---|---|---|---|---|"]
    print("\n" + "\n".join(lines))
    table = []
    for method in args.methods:
        for variable in likelihood.VARIABLES:
            for tolerance in args.tolerances:
                bpd, nfe, seconds = toolkit(model, method=method, variable=variable, rtol=tolerance,
                                            atol=tolerance)
                entry = {"method": method, "variable": variable, "tolerance": tolerance, "nfe": nfe,
                         "seconds": seconds, "error_mean_bpd": abs(bpd.mean() - reference.mean()).item(),
                         "error_max_image_bpd": (bpd - reference).abs().max().item()}
                table.append(entry)
                lines.append(f"| {method} | {variable} | {tolerance:g} | {nfe} | {seconds:.1f} | "
                             f"{entry['error_mean_bpd']:.1e} | {entry['error_max_image_bpd']:.1e} |")
                print(lines[-1], flush=True)

    if not args.no_append:
        side_by_side = [
            f"Model: {description}; {len(images)} {args.split} images, one dequantization draw "
            f"and one Hutchinson probe per image shared by every method; reference: dopri5 at "
            f"{args.reference_tol:g} with a float64 network, {reference.mean():.4f} bits/dim.", "",
            "| method | NFE | seconds | abs error of mean bpd | worst image |", "|---|---|---|---|---|"]
        side_by_side += [f"| {r['method']} | {r['nfe']} | {r['seconds']:.1f} | {r['error_mean_bpd']:.1e} | "
                         f"{r['error_max_image_bpd']:.1e} |" for r in (baseline, default)]
        side_by_side += ["", f"Wall-time ratio score_sde protocol / toolkit default (medians of "
                             f"{args.rounds} interleaved rounds; per round {round_ratios}) = {speedup:.2f}x "
                             f"(target >= {TARGET_SPEEDUP:g}x within {TARGET_ERROR_BPD} bits/dim: "
                             f"{'met' if verdict == 'meets' else 'not met'}).", "", "Error against cost:", ""]
        command = command_line()
        append_to_benchmarks("Likelihood speed (probability-flow ODE bits/dim)", command,
                             "\n".join(side_by_side + lines))
    if args.output:
        Path(args.output).write_text(json.dumps({
            "model": description, "sde": repr(sde), "num_images": len(images), "eps": args.eps,
            "reference_bpd": reference.mean().item(), "reference_spread_bpd": reference_spread,
            "baseline": baseline, "default": default, "speedup": speedup, "table": table}, indent=2))


if __name__ == "__main__":
    main()
