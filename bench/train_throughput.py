"""Training (fp32, bf16) and sampling throughput of our U-Net against diffusers' matched UNet2DModel.

    python -m bench.train_throughput --config configs/mnist_vp_release.py --rounds 7 --steps 4
    python -m bench.train_throughput --modes train-fp32 sample-fp32   # skip the slow bf16 rows

Runs the real training step (loss of sde/losses.py, backward, gradient clipping, Adam,
EMA) on random data of the config's shape for two networks: our U-Net of the config, and
diffusers' UNet2DModel laid out the same way (``bench.peers.matched_unet_kwargs``: the same
widths, blocks, attention resolutions, single-head attention; both parameter counts are
printed), trained with the same eps-prediction loss on the same batch through a thin
wrapper that feeds it our continuous t as the timestep N t / T - 1 (``bench.peers``).
Each network runs in both memory layouts: NHWC (channels-last; our default,
``model.channels_last``) and NCHW (PyTorch's and diffusers' default; diffusers' docs suggest
``unet.to(memory_format=torch.channels_last)``, so it gets that chance too). Each round times,
for every network, fp32 and bf16-autocast training steps and fp32 network evaluations in
eval mode under ``torch.inference_mode`` (the sampling workload), interleaved, so that drift
in the machine's load hits all alike; the table gives the median images/s of each and the
ratios of ours (default layout) to diffusers in its default layout, and of each network in
its faster layout (above 1: ours is faster). Below it: the fastest training of ours (any
precision and layout) against diffusers out of the box (fp32, NCHW), the comparison of the
comparison a user sees. Writes ``bench/results/train_throughput.json``. bf16 is slow on CPUs
without AVX512-BF16 / AMX for both networks alike (``--modes train-fp32 sample-fp32`` skips it).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import add_run_options, apply_threads, footnotes, format_reading, load_config, table, write_result
from bench.peers import matched_unet, require_diffusers
from sde.losses import LossConfig, make_loss_fn
from sde.models import count_parameters, create_model
from sde.modes.train import EMA, autocast_context
from sde.sdes import create_sde

NAME, TITLE = "train_throughput", "Training throughput: our U-Net vs diffusers UNet2DModel"

#: What is timed, by the flag that selects it: (row label, training step or not, bf16 autocast).
MODES = {"train-fp32": ("training, fp32", True, False),
         "train-bf16": ("training, bf16 autocast", True, True),
         "sample-fp32": ("network evaluation (sampling), fp32", False, False)}
LAYOUTS = {"NHWC": torch.channels_last, "NCHW": torch.contiguous_format}


def networks(config, sde) -> dict[str, torch.nn.Module]:
    """Our U-Net and diffusers' matched UNet2DModel, each in both layouts, same initial weights
    per family (the layout does not change the numbers)."""
    nets = {}
    for layout, memory_format in LAYOUTS.items():
        torch.manual_seed(0)
        ours_config = config.copy_and_resolve_references()
        ours_config.model.channels_last = memory_format == torch.channels_last
        nets[f"ours {layout}"] = create_model(ours_config)
        torch.manual_seed(0)
        nets[f"diffusers {layout}"] = matched_unet(config, sde).to(memory_format=memory_format)
    return nets


class Trainee:
    """One network with its EMA and optimizer, as the training loop holds it."""

    def __init__(self, config, model: torch.nn.Module):
        self.config = config
        self.model = model
        self.ema = EMA(model, config.model.ema_rate)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.training.lr)

    def timed_round(self, loss_fn, batch: torch.Tensor, mode: str, steps: int) -> float:
        """Images per second over ``steps`` full training steps, or ``steps`` evaluations of the
        network in eval mode under ``torch.inference_mode`` (what a sampler does), per ``mode``."""
        _, train, amp = MODES[mode]
        if not train:
            return self.timed_evaluations(batch, steps)
        self.model.train()
        start = time.perf_counter()
        for _ in range(steps):
            self.optimizer.zero_grad(set_to_none=True)
            with autocast_context(batch.device, amp):
                loss = loss_fn(self.model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.training.grad_clip)
            self.optimizer.step()
            self.ema.update(self.model, 1000)
        return steps * batch.shape[0] / (time.perf_counter() - start)

    @torch.inference_mode()
    def timed_evaluations(self, batch: torch.Tensor, steps: int) -> float:
        """Images per second over ``steps`` network evaluations, as a sampler makes them."""
        self.model.eval()
        t = torch.rand(batch.shape[0], generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        for _ in range(steps):
            self.model(batch, t)
        return steps * batch.shape[0] / (time.perf_counter() - start)


def _fastest(images_per_s: dict, family: str, mode: str) -> tuple[str, float]:
    name = max((n for n in images_per_s[mode] if n.startswith(family)), key=lambda n: images_per_s[mode][n])
    return name, images_per_s[mode][name]


def render(result: dict) -> str:
    rates = result["images_per_s"]
    networks = result["networks"]
    labels = {mode: MODES[mode][0] if mode in MODES else mode for mode in rates}
    rows = []
    for mode, by_network in rates.items():
        rows.append([labels[mode]] + [f"{by_network[name]:.1f}" for name in networks]
                    + [f"{by_network['ours NHWC'] / by_network['diffusers NCHW']:.2f}",
                       f"{_fastest(rates, 'ours', mode)[1] / _fastest(rates, 'diffusers', mode)[1]:.2f}"])
    parts = [f"`{result['config']}`: our U-Net {result['parameters']['ours']:,} parameters, diffusers' "
             f"UNet2DModel laid out the same way {result['parameters']['diffusers']:,}. Batch "
             f"{result['batch_size']}; images/s, medians of {result['rounds']} interleaved rounds of "
             f"{result['steps']} steps.", "",
             table(["images/s"] + networks + ["ours NHWC / diffusers NCHW", "ours best / diffusers best"], rows)]
    reading = []
    training = [mode for mode in rates if MODES.get(mode, ("", False))[1]]
    if "train-fp32" in rates and training:
        mode, (name, ours) = max(((m, _fastest(rates, "ours", m)) for m in training), key=lambda r: r[1][1])
        default = rates["train-fp32"]["diffusers NCHW"]
        reading.append(f"Our fastest training ({name}, {labels[mode]}) runs at {ours:.1f} images/s, "
                       f"{ours / default:.2f}x diffusers out of the box (NCHW, fp32: {default:.1f}).")
        equal = ", ".join(f"{labels[m]} {_fastest(rates, 'ours', m)[1] / _fastest(rates, 'diffusers', m)[1]:.2f}x"
                          for m in training)
        reading.append(f"At equal precision, each network in its faster layout: {equal}.")
    supplements = result.get("supplements", [])
    markers, notes = footnotes(supplements)
    for part, marker in [(result, "")] + list(zip(supplements, markers)):
        part_rates = part["images_per_s"]
        if {"train-fp32", "train-bf16"} <= set(part_rates):
            speedups = ", ".join(f"{name} {part_rates['train-bf16'][name] / part_rates['train-fp32'][name]:.2f}x"
                                 for name in part["networks"])
            reading.append(f"bf16 autocast over fp32 in training{marker} ({part['machine'].get('cpu', 'CPU')}): "
                           f"{speedups}.")
    if notes:
        parts += [""] + notes
    return "\n".join(parts) + "\n\n" + format_reading(reading)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_vp_release.py")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed round")
    parser.add_argument("--batch-size", type=int, default=0, help="0: the config's training.batch_size")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                        help="what to time (default: all; train-bf16 is slow without AVX512-BF16)")
    add_run_options(parser)
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be >= 1")
    require_diffusers()
    apply_threads(args)
    config = load_config(args.config)
    sde = create_sde(config)
    trainees = {name: Trainee(config, net) for name, net in networks(config, sde).items()}
    counts = {name.split()[0]: count_parameters(trainee.model) for name, trainee in trainees.items()}
    loss_fn = make_loss_fn(sde, LossConfig(continuous=config.training.continuous))
    batch_size = args.batch_size or config.training.batch_size
    shape = (batch_size, config.data.num_channels, config.data.image_size, config.data.image_size)
    batch = torch.rand(shape) * 2 - 1
    print(f"{args.config}: our U-Net {counts['ours']:,} parameters, diffusers UNet2DModel "
          f"{counts['diffusers']:,} parameters; batch {batch_size}, {torch.get_num_threads()} threads",
          flush=True)

    runs = [(name, mode) for mode in args.modes for name in trainees]
    for name, mode in runs:  # warm-up: allocator, autocast caches, oneDNN primitives
        trainees[name].timed_round(loss_fn, batch, mode, 1)
    rates: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    for round_index in range(args.rounds):
        for name, mode in runs:
            rates[(name, mode)].append(trainees[name].timed_round(loss_fn, batch, mode, args.steps))
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{name} {mode} {rates[(name, mode)][-1]:.1f}" for name, mode in runs),
            flush=True)
    result = {"config": args.config, "parameters": counts, "batch_size": batch_size, "rounds": args.rounds,
              "steps": args.steps, "networks": list(trainees),
              "images_per_s": {mode: {name: statistics.median(rates[(name, mode)]) for name in trainees}
                               for mode in args.modes},
              "per_round": {mode: {name: rates[(name, mode)] for name in trainees} for mode in args.modes}}
    write_result(args, NAME, TITLE, result, render)


if __name__ == "__main__":
    main()
