"""How long until bits/dim can be trusted? Probability-flow ODE likelihoods side by side.

    python -m bench.likelihood_speed --config configs/mnist_vp_release.py \
        --checkpoint release/mnist_vp_release.safetensors      # the released model
    python -m bench.likelihood_speed --workdir runs/mnist_vp   # a trained run
    python -m bench.likelihood_speed --config configs/mnist_vp.py --train-steps 300 --no-write

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
drift on shared machines; the ratios are measured side by side in one run. Writes
``bench/results/likelihood_speed.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path

import ml_collections
import numpy as np
import torch
from scipy.integrate import solve_ivp

from bench.common import (add_run_options, apply_threads, format_reading, load_config, model_text, repo_relative,
                          table, write_result)
from sde import likelihood
from sde.data import EmbeddedMNISTWarning, evaluation_subset, load_dataset, uint8_to_float
from sde.inference import load_ema_model
from sde.losses import LossConfig, make_loss_fn
from sde.models import create_model
from sde.sdes import SDE, broadcast_to, create_sde

NAME, TITLE = "likelihood_speed", "Likelihood speed (probability-flow ODE bits/dim)"
Tensor = torch.Tensor
TABLE_TOLERANCES = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
TABLE_METHODS = ("dopri5", "bosh3")
SCORE_SDE_TOLERANCE = 1e-5


# ---- the model --------------------------------------------------------------------------
def load_workdir_model(workdir: str, device: torch.device) -> tuple[torch.nn.Module, ml_collections.ConfigDict, dict]:
    """The EMA network of a toolkit run, with the run's own config.json."""
    config_path = Path(workdir) / "config.json"
    if not config_path.is_file():
        raise SystemExit(f"error: {config_path} not found; --workdir must be a toolkit run directory")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    model, source, step = load_ema_model(config, workdir, device)
    return model, config, {"checkpoint": repo_relative(source), "step": step}


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


def render(result: dict) -> str:
    baseline, default = result["baseline"], result["default"]
    rounds = result["round_ratios"]

    def cells(row: dict) -> list:
        return [row["nfe"], f"{row['seconds']:.1f}", f"{row['error_mean_bpd']:.1e}", f"{row['error_max_image_bpd']:.1e}"]

    parts = [f"{model_text(result['model'])}; {result['num_images']} {result['split']} images, one "
             "dequantization draw and one Hutchinson probe per image shared by every method; error against a "
             f"reference of dopri5 at {result['reference_tol']:g} with a float64 network "
             f"({result['reference_bpd']:.4f} bits/dim). The first two rows are timed in "
             f"{result['rounds']} interleaved rounds (medians); the rest is the error against cost of the "
             "toolkit's solver:", "",
             table(["method", "NFE", "seconds", "abs error of mean bits/dim", "worst image"],
                   [[row["method"]] + cells(row) for row in (baseline, default)]
                   + [[f"{row['method']} in {row['variable']}, rtol = atol = {row['tolerance']:g}"] + cells(row)
                      for row in result["table"]])]
    if result.get("note"):
        parts += ["", result["note"]]
    reading = [f"The toolkit's default is {result['speedup']:.2f}x faster than score_sde's protocol "
               f"({default['nfe']} against {baseline['nfe']} NFE"
               + (f"; per round {min(rounds):.2f}-{max(rounds):.2f}x over {len(rounds)} rounds" if len(rounds) > 1 else "")
               + f") for an error of {default['error_mean_bpd']:.4f} bits/dim "
               f"(worst image {default['error_max_image_bpd']:.4f}) against the reference, where the protocol's "
               f"is {baseline['error_mean_bpd']:.4f}."]
    if result["table"]:
        cheapest = min(result["table"], key=lambda row: row["seconds"])
        reading.append(f"The cheapest setting of the error table, {cheapest['method']} in {cheapest['variable']} "
                       f"at {cheapest['tolerance']:g} ({cheapest['nfe']} NFE), errs by "
                       f"{cheapest['error_mean_bpd']:.4f} bits/dim (worst image {cheapest['error_max_image_bpd']:.4f}).")
    return "\n".join(parts) + "\n\n" + format_reading(reading)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="toolkit run directory (config.json + checkpoints/)")
    source.add_argument("--config", help="configs/*.py: with --checkpoint its weights, else a fresh "
                                         "network trained for --train-steps")
    parser.add_argument("--checkpoint", default="",
                        help="with --config: .safetensors weights or a checkpoint .pt (EMA) to measure")
    parser.add_argument("--train-steps", type=int, default=300,
                        help="with --config and no --checkpoint: Adam steps before measuring (default 300)")
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
    add_run_options(parser)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.checkpoint and not args.config:
        parser.error("--checkpoint goes with --config (a --workdir run uses its newest checkpoint)")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint {args.checkpoint} does not exist")
    apply_threads(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    if args.workdir:
        model, config, description = load_workdir_model(args.workdir, device)
    else:
        config = load_config(args.config)
    if args.data_dir:
        config.data.data_dir = args.data_dir
    config.data.download = False
    sde = create_sde(config)
    if args.checkpoint:
        model, source, step = load_ema_model(config, "", device, args.checkpoint)
        description = {"checkpoint": repo_relative(source), "step": step}
    elif not args.workdir:
        train_images, _ = load_dataset(config, "test" if args.split != "test" else "train")
        print(f"training a fresh {config.model.name} for {args.train_steps} steps ...", flush=True)
        model = quickly_trained_model(config, sde, train_images, args.train_steps, args.seed, device)
        description = {"checkpoint": f"{repo_relative(args.config)}, quickly trained for {args.train_steps} steps"}

    with warnings.catch_warnings():  # never measure "held-out" bits/dim on a fallback split
        warnings.simplefilter("error", EmbeddedMNISTWarning)
        images, _ = evaluation_subset(*load_dataset(config, args.split), args.num_images, seed=args.seed)
    dims = images[0].numel()
    generator = torch.Generator().manual_seed(args.seed)
    x = uint8_to_float(images, dequantize=True, generator=generator).to(device)
    probe = (2.0 * torch.randint(0, 2, x.shape, generator=generator).double() - 1.0).to(device)
    print(f"model: {description['checkpoint']}; sde: {sde!r}; {len(images)} {config.data.dataset} "
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
    print(f"wall-time ratio (b)/(c) = {speedup:.2f}x", flush=True)

    # error against cost
    rows = []
    for method in args.methods:
        for variable in likelihood.VARIABLES:
            for tolerance in args.tolerances:
                bpd, nfe, seconds = toolkit(model, method=method, variable=variable, rtol=tolerance,
                                            atol=tolerance)
                rows.append({"method": method, "variable": variable, "tolerance": tolerance, "nfe": nfe,
                             "seconds": seconds, "error_mean_bpd": abs(bpd.mean() - reference.mean()).item(),
                             "error_max_image_bpd": (bpd - reference).abs().max().item()})
                print(f"{method} {variable} {tolerance:g}: NFE {nfe}, {seconds:.1f} s, "
                      f"|d bpd| {rows[-1]['error_mean_bpd']:.1e}", flush=True)

    result = {"model": description, "sde": repr(sde), "split": args.split, "num_images": len(images),
              "eps": args.eps, "reference_tol": args.reference_tol, "reference_bpd": reference.mean().item(),
              "reference_spread_bpd": reference_spread, "rounds": args.rounds,
              "round_ratios": [b / c for b, c in zip(baseline_seconds, default_seconds)],
              "baseline": baseline, "default": default, "speedup": speedup, "table": rows}
    write_result(args, NAME, TITLE, result, render)


if __name__ == "__main__":
    main()
