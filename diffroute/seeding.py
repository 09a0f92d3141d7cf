"""Per-sample random generators: sample i is seeded with seed + i (its global index), so an image never depends on
the batch or process it was generated in."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def sample_generators(seed: int, indices: Iterable[int], device=None) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(seed) + int(i)) for i in indices]


MAX_SEED = 2**63 - 1 - 10**7  # torch seeds are signed 64-bit; sample i uses seed + i (room for 10 million samples)
