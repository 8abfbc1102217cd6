"""Training batches: ``BatchStream`` is an infinite, seeded iterator over one split whose
``state_dict()`` = (epoch, position) resumes at the exact sample, bit for bit, and which
shards each global batch across DistributedDataParallel ranks.
"""
from __future__ import annotations

from collections.abc import Mapping

import ml_collections
import torch

from sde import randomness
from sde.data.datasets import load_dataset
from sde.data.scaling import training_view
from sde.data.seeds import AUGMENTATION_STREAM, PERMUTATION_STREAM, derived_generator

Tensor = torch.Tensor


class BatchStream:
    """Infinite, seeded, resumable stream of training batches, shardable across ranks.

    Epoch ``e`` visits the data in ``randperm(N)`` drawn from a generator seeded by
    (seed, e); global batches are consecutive runs of ``batch_size`` indices of that
    order, and the last ``N mod batch_size`` indices of each epoch are dropped. Rank ``r``
    of ``world_size`` takes rows ``[r b, (r+1) b)`` of every global batch, ``b =
    batch_size // world_size``. Dequantization noise and flips of a global batch come
    from a generator seeded by (seed, epoch, position); every rank draws them for the
    whole global batch (one batch of uint8 images: cheap) and keeps its rows, so the ranks'
    batches concatenated in rank order equal the single-process batch bit for bit, and a
    stream restored from ``state_dict()`` repeats exactly what the original would have
    produced.

    Yields float32 batches (uint8 images scaled by ``uint8_to_float``; float data as is),
    or (batch, labels) pairs when ``labels`` is given.
    """

    def __init__(self, data: Tensor, batch_size: int, seed: int, *, labels: Tensor | None = None,
                 dequantize: bool = False, random_flip: bool = False, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or batch_size > len(data):
            raise ValueError(f"batch_size must be in 1..{len(data)} (the number of examples), got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(f"the global batch_size {batch_size} must be divisible by world_size {world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if labels is not None and len(labels) != len(data):
            raise ValueError(f"got {len(labels)} labels for {len(data)} examples")
        if data.dtype != torch.uint8 and dequantize:
            raise ValueError(f"dequantize needs uint8 images, got {data.dtype} data")
        if random_flip and data.ndim != 4:
            raise ValueError(f"random_flip needs images [N, C, H, W], got shape {tuple(data.shape)}")
        self.data, self.labels = data, labels
        self.batch_size, self.seed = batch_size, seed
        self.dequantize, self.random_flip = dequantize, random_flip
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = batch_size // world_size
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, torch.empty(0, dtype=torch.int64)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.data) // self.batch_size

    def state_dict(self) -> dict[str, int]:
        """Where the stream is: the next global batch starts at ``position`` of epoch ``epoch``."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_examples": len(self.data)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if (state["seed"], state["num_examples"]) != (self.seed, len(self.data)):
            raise ValueError(f"state is for seed={state['seed']} over {state['num_examples']} examples; this stream "
                             f"has seed={self.seed} over {len(self.data)}")
        if state["epoch"] < 0 or not 0 <= state["position"] <= len(self.data):
            raise ValueError(f"invalid stream state epoch={state['epoch']}, position={state['position']}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Tensor | tuple[Tensor, Tensor]:
        if self.position + self.batch_size > len(self.data):
            self.epoch, self.position = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            self._order = randomness.randperm(len(self.data), generator=derived_generator(PERMUTATION_STREAM, self.seed,
                                                                               self.epoch))
            self._order_epoch = self.epoch
        global_indices = self._order[self.position:self.position + self.batch_size]
        augmentation = derived_generator(AUGMENTATION_STREAM, self.seed, self.epoch, self.position)
        self.position += self.batch_size
        batch = training_view(self.data[global_indices], random_flip=self.random_flip,
                              dequantize=self.dequantize, generator=augmentation)
        rows = slice(self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size)
        batch = batch[rows].to(torch.float32)
        return batch if self.labels is None else (batch, self.labels[global_indices[rows]])


def create_batch_stream(config: ml_collections.ConfigDict, *, rank: int = 0, world_size: int = 1) -> BatchStream:
    """The training stream of ``config``: ``config.data.split`` in global batches of
    ``config.training.batch_size``, seeded by ``config.seed``, dequantized / flipped as
    ``config.data`` says, rank ``rank`` of ``world_size``; (images, labels) pairs for a
    class-conditional network (``model.num_classes`` > 0)."""
    data, labels = load_dataset(config)
    conditional = config.model.get("num_classes", 0) > 0  # a class-conditional network trains on the labels
    return BatchStream(data, config.training.batch_size, config.seed, labels=labels if conditional else None,
                       dequantize=config.data.dequantize,
                       random_flip=config.data.random_flip, rank=rank, world_size=world_size)


class DevicePrefetcher:
    """A ``BatchStream`` one batch ahead on the training device.

    ``take()`` returns the batch prepared earlier (already on ``device``) and ``prefetch()``
    prepares the next one: on the CPU (reading, dequantizing, flipping), then, on a CUDA
    device, into pinned memory and onto the GPU with a non-blocking copy. The training step
    calls ``prefetch()`` after it has queued its GPU work and before it waits for the GPU,
    so the next batch is made while the GPU computes. ``state_dict()`` is the stream's
    position before the batch not yet taken, so a checkpoint resumes at that batch.
    """

    def __init__(self, stream: BatchStream, device: torch.device):
        self.stream, self.device = stream, torch.device(device)
        self._pending: Tensor | tuple[Tensor, Tensor] | None = None
        self._pending_state: dict[str, int] = stream.state_dict()
        self.prefetch()

    def _to_device(self, batch: Tensor) -> Tensor:
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def prefetch(self) -> None:
        """Prepare the next batch (once: a pending batch is kept until taken)."""
        if self._pending is not None:
            return
        self._pending_state = self.stream.state_dict()
        batch = next(self.stream)
        self._pending = (tuple(self._to_device(part) for part in batch) if isinstance(batch, tuple)
                         else self._to_device(batch))

    def take(self) -> Tensor | tuple[Tensor, Tensor]:
        """The next batch, on the device."""
        self.prefetch()
        batch, self._pending = self._pending, None
        return batch

    def state_dict(self) -> dict[str, int]:
        """Where the stream resumes: at the batch ``take()`` gives next."""
        return dict(self._pending_state) if self._pending is not None else self.stream.state_dict()
