"""Device selection and torch.distributed set-up (torchrun: NCCL on GPUs, gloo on CPU).

One process per device. ``torchrun`` sets RANK, LOCAL_RANK and WORLD_SIZE; without them
the run is a single process and nothing here initialises a process group, and every
collective below is the identity.

Evaluation combines ranks with tensor collectives only (no pickled objects): sums of
sufficient statistics (`all_reduce_arrays`), tensors whose rows each rank fills for its
own items (`sum_over_ranks`, exact), and batches streamed to rank 0 (`gather_to_main`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes logs, checkpoints and results."""
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world_size


def parse_device(name: str, local_rank: int = 0) -> torch.device:
    """The device ``config.device`` names: ``"auto"`` is the local rank's GPU when CUDA is
    available, else the CPU; a ValueError names what is accepted."""
    if name == "auto":
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"device={name!r} is not a device; accepted: 'auto', 'cpu', 'cuda', 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; accepted here: 'auto', 'cpu'")
    return device


def resolve_device(name: str, local_rank: int = 0, tf32: bool = True) -> torch.device:
    """``parse_device``, set up for the run: on a CUDA device ``tf32`` lets float32 matmuls and
    convolutions use TF32 tensor cores (Ampere and later: a 10-bit mantissa in the products,
    float32 accumulation); it changes nothing on a CPU."""
    device = parse_device(name, local_rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    return device


def setup(device_name: str, tf32: bool = True) -> Context:
    """Initialise the process group when launched by torchrun; return this rank's context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Context(0, 1, resolve_device(device_name, tf32=tf32))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank, tf32)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Context(dist.get_rank(), dist.get_world_size(), device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def is_distributed() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    """Where collective tensors live: this rank's GPU under NCCL, else the CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over ranks, on ``tensor``'s device (a copy; the identity in one
    process).

    To assemble per-item values computed by different ranks, each rank fills the rows of
    its own items in a zero tensor of the full size: every entry then has exactly one
    nonzero term and x + 0 = x exactly, so the sum is the single-process tensor bit for bit.
    """
    if not is_distributed():
        return tensor.clone()
    buffer = tensor.to(_collective_device(), copy=True)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(tensor.device)


def all_reduce_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Sum each numpy array over ranks in its own dtype (float64 sums, int64 counts): the
    sufficient statistics of a set split between ranks become those of the whole set."""
    if not is_distributed():
        return arrays
    return {name: sum_over_ranks(torch.from_numpy(np.ascontiguousarray(array))).numpy().reshape(np.shape(array))
            for name, array in arrays.items()}


def gather_to_main(tensor: torch.Tensor) -> list[torch.Tensor] | None:
    """Every rank's ``tensor`` (one shape and dtype on all ranks) on rank 0, in rank order,
    on the CPU; None on the other ranks. One process: ``[tensor]``."""
    if not is_distributed():
        return [tensor]
    local = tensor.to(_collective_device())
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())] if dist.get_rank() == 0 else None
    dist.gather(local, parts, dst=0)
    return [part.cpu() for part in parts] if parts is not None else None


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
