"""Seeds of the data's random streams: one 64-bit seed per tuple of words.

Each stream (the epoch permutation, a batch's augmentation, a toy set's points) draws from
its own generator, seeded from (stream, seed, ...) by numpy's SeedSequence hashing, so
streams never overlap and any batch can be regenerated from its words alone (exact resume).
"""
from __future__ import annotations

import numpy as np
import torch

# Independent random streams: first word of every derived seed.
PERMUTATION_STREAM, AUGMENTATION_STREAM, TOY_STREAM = 0, 1, 2


def derived_seed(*words: int) -> int:
    """A 64-bit seed from non-negative integers (numpy SeedSequence hashing).

    SeedSequence ignores trailing zero words, so each stream uses a fixed number of
    words and a distinct first word (``*_STREAM``).
    """
    return int(np.random.SeedSequence(list(words)).generate_state(1, dtype=np.uint64)[0])


def derived_generator(*words: int) -> torch.Generator:
    """A CPU generator seeded by ``derived_seed(*words)``."""
    return torch.Generator().manual_seed(derived_seed(*words))
