"""Training throughput of our U-Net against diffusers' UNet2DModel of matched size, fp32 and bf16.

    python bench/train_throughput.py --config configs/mnist_vp_release.py --rounds 5 --steps 5

Runs the real training step (loss of sde/losses.py, backward, gradient clipping, Adam,
EMA) on random data of the config's shape for two networks: our U-Net of the config, and
diffusers' UNet2DModel laid out the same way (``bench/peers.matched_unet_kwargs``: the same
widths, blocks, attention resolutions, single-head attention; both parameter counts are
printed), trained with the same eps-prediction loss on the same batch through a thin
wrapper that feeds it our continuous t as the timestep N t / T - 1 (``bench/peers.py``).
Each round times fp32 and bf16 autocast steps of both networks, interleaved, so that drift
in the machine's load hits all four alike; the table gives the median images/s of each and
the ratio ours / theirs per precision (above 1: ours trains faster), and is appended to
BENCHMARKS.md. bf16 is slow on CPUs without AVX512-BF16 / AMX for both networks alike.
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

from bench.common import append_to_benchmarks, load_config  # noqa: E402
from bench.peers import matched_unet, require_diffusers  # noqa: E402
from sde.losses import LossConfig, make_loss_fn  # noqa: E402
from sde.models import count_parameters, create_model  # noqa: E402
from sde.run_train import EMA, autocast_context  # noqa: E402
from sde.sdes import create_sde  # noqa: E402

PRECISIONS = {"fp32": False, "bf16 autocast": True}


class Trainee:
    """One network with its EMA and optimizer, as the training loop holds it."""

    def __init__(self, config, model: torch.nn.Module):
        self.config = config
        self.model = model
        self.ema = EMA(model, config.model.ema_rate)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.training.lr)

    def timed_round(self, loss_fn, batch: torch.Tensor, amp: bool, steps: int) -> float:
        """Images per second over ``steps`` full training steps."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_vp_release.py")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed round")
    parser.add_argument("--batch-size", type=int, default=0, help="0: the config's training.batch_size")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-append", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be >= 1")
    require_diffusers()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config)
    sde = create_sde(config)
    torch.manual_seed(0)
    trainees = {"ours": Trainee(config, create_model(config)),
                "diffusers": Trainee(config, matched_unet(config, sde))}
    counts = {name: count_parameters(trainee.model) for name, trainee in trainees.items()}
    loss_fn = make_loss_fn(sde, LossConfig(continuous=config.training.continuous))
    batch_size = args.batch_size or config.training.batch_size
    shape = (batch_size, config.data.num_channels, config.data.image_size, config.data.image_size)
    batch = torch.rand(shape) * 2 - 1
    print(f"{args.config}: our U-Net {counts['ours']:,} parameters, diffusers UNet2DModel "
          f"{counts['diffusers']:,} parameters; batch {batch_size}, {torch.get_num_threads()} threads",
          flush=True)

    runs = [(name, precision) for precision in PRECISIONS for name in trainees]
    for name, precision in runs:  # warm-up: allocator, autocast caches
        trainees[name].timed_round(loss_fn, batch, PRECISIONS[precision], 1)
    rates: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    for round_index in range(args.rounds):
        for name, precision in runs:
            rates[(name, precision)].append(
                trainees[name].timed_round(loss_fn, batch, PRECISIONS[precision], args.steps))
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{name} {precision} {rates[(name, precision)][-1]:.1f}" for name, precision in runs),
            flush=True)
    median = {run: statistics.median(values) for run, values in rates.items()}

    lines = [f"Our U-Net: {counts['ours']:,} parameters; diffusers UNet2DModel (matched layout): "
             f"{counts['diffusers']:,} parameters. Batch {batch_size}, {args.rounds} rounds of "
             f"{args.steps} steps, interleaved.", "",
             "| precision | ours images/s | diffusers images/s | ours / diffusers |",
             "|---|---|---|---|"]
    for precision in PRECISIONS:
        ours, theirs = median[("ours", precision)], median[("diffusers", precision)]
        lines.append(f"| {precision} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |")
    first, second = PRECISIONS
    lines += ["", "bf16 / fp32 throughput: " + ", ".join(
        f"{name} {median[(name, second)] / median[(name, first)]:.2f}" for name in trainees)]
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        command = "python bench/train_throughput.py " + " ".join(sys.argv[1:])
        append_to_benchmarks("Training throughput: our U-Net vs diffusers UNet2DModel", command, table)


if __name__ == "__main__":
    main()
