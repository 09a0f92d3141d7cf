"""Genomes <-> schedules, and the seeds of the initial population (FORA-N, attention-only, block ranges, random)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from diffroute.arch import ArchitectureMap
from diffroute.schedule import Schedule


class GenomeSpace:
    """One bit per (step >= 1, block, present component); step 0 always computes and absent cells are not genes."""

    def __init__(self, arch: ArchitectureMap, num_steps: int):
        self.arch, self.num_steps = arch, num_steps
        self.present = arch.present()
        self.n_var = (num_steps - 1) * int(self.present.sum())

    def to_schedule(self, bits: np.ndarray, provenance: dict | None = None) -> Schedule:
        compute = torch.ones(self.num_steps, *self.present.shape, dtype=torch.bool)
        body = compute[1:]
        body[:, self.present] = torch.from_numpy(np.asarray(bits, dtype=bool).reshape(self.num_steps - 1, -1))
        return Schedule(compute, self.arch.model_class, self.arch.components, dict(provenance or {}))

    def from_schedule(self, schedule: Schedule) -> np.ndarray:
        return schedule.compute[1:][:, self.present].reshape(-1).numpy().astype(bool)

    @staticmethod
    def key(bits: np.ndarray) -> str:
        return hashlib.sha1(np.packbits(np.asarray(bits, dtype=bool)).tobytes()).hexdigest()[:16]

    def seeds(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """Hand-made schedules first, then random ones of varied density, `size` in all, no duplicates."""
        a, s = self.arch, self.num_steps
        attn = [c for c in a.components if "attn" in c]
        made = [Schedule.fora(a, s, n) for n in (2, 3, 4, 5)]
        made += [Schedule.intervals(a, s, {c: n for c in attn}) for n in (2, 3)]
        made += [Schedule.intervals(a, s, {c: 2 for c in a.components if c not in attn})]
        nb = a.num_blocks
        if s > 4:  # the middle steps of inner blocks (needs steps left at both ends)
            rule = {"blocks": (1, max(nb - 1, 2)), "steps": (2, s - 2)}
            made += [Schedule.ranges(a, s, [dict(rule, every=n)]) for n in (2, 3)]
        out, keys = [], set()
        for bits in [self.from_schedule(m) for m in made if m.num_blocks == nb]:
            if self.key(bits) not in keys and len(out) < size:
                out.append(bits)
                keys.add(self.key(bits))
        while len(out) < size:
            bits = rng.random(self.n_var) < rng.uniform(0.2, 0.9)
            if self.key(bits) not in keys:
                out.append(bits)
                keys.add(self.key(bits))
        return np.stack(out)
