"""Per-sample random generators: sample i is seeded with seed + i (its global index), so an image never depends on
the batch or process it was generated in."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from diffroute.utils.limits import MAX_SEED  # noqa: F401  (re-exported: the bound on seeds)


def sample_generators(seed: int, indices: Iterable[int], device=None) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(seed) + int(i)) for i in indices]
