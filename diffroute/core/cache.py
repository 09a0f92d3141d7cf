"""Feature cache: per-sample component outputs kept on the activations' device, in buffers reused across steps."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch


def tensors_of(out: Any) -> list[torch.Tensor | None]:
    """The tensors of a component output: a tensor, or a tuple/list of tensors (joint attention returns two)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and all(o is None or isinstance(o, torch.Tensor) for o in out):
        return list(out)
    raise TypeError(f"diffroute can cache tensors or tuples of tensors, not {type(out).__name__}.")


def rebuild(kind: type, bufs: list) -> Any:
    """The output in its original form (tensor or tuple) from its tensors."""
    return bufs[0] if issubclass(kind, torch.Tensor) else kind(bufs)


class _Entry:
    """Buffers of one key: the newest output and, with history, the one before (for forecasting)."""

    def __init__(self, kind: type, bufs: list, step: int):
        self.kind, self.slots, self.steps = kind, [bufs], [step]
        self.version = 0  # bumped by every store: what a kept sum of this entry was made from


class FeatureCache:
    """Holds the last computed output of each (branch, block, component) key.

    A stored output is copied into the key's existing buffers when shapes match, so a call allocates each buffer
    once (twice with `history=2`, which keeps the previous output too, for Taylor forecasts); `clear()` drops them
    all at the end of the call. Values stay on their device: no host copies, no syncs.

    With `keep_graph` (training through the history, `policies/refining.py`) the outputs themselves are kept, with
    their autograd graph, instead of copies into buffers: a buffer written in place at a later step would invalidate
    what autograd saved from it, and a copy would cut the gradient.
    """

    def __init__(self, history: int = 1, keep_graph: bool = False):
        self.history, self.keep_graph = history, keep_graph
        self._store: dict[Hashable, _Entry] = {}
        self._sums: dict[tuple, tuple[tuple, torch.Tensor]] = {}  # keys -> (their versions, the sum of them)
        self._stores = 0
        self.bytes = 0
        self.peak_bytes = 0

    def put(self, key: Hashable, out: Any, step: int = 0) -> None:
        self._stores += 1
        self._put(key, out, step)
        self._store[key].version = self._stores

    def _put(self, key: Hashable, out: Any, step: int) -> None:
        new = tensors_of(out)
        entry = self._store.get(key)
        if self.keep_graph:
            kept = entry is not None and _same_layout(entry.slots[0], new)
            fresh = _Entry(type(out), list(new), step)
            if kept:
                fresh.slots += entry.slots[: self.history - 1]
                fresh.steps += entry.steps[: self.history - 1]
            self._store[key] = fresh
            return
        if entry is not None and not _same_layout(entry.slots[0], new):
            self.bytes -= sum(_nbytes(s) for s in entry.slots)
            del self._store[key]
            entry = None
        if entry is None:
            bufs = _clone(new)
            self._store[key] = _Entry(type(out), bufs, step)
            self._grow(_nbytes(bufs))
            return
        if self.history > 1 and len(entry.slots) < self.history:  # second slot: allocate once
            entry.slots.insert(0, _clone(new))
            entry.steps.insert(0, step)
            self._grow(_nbytes(entry.slots[0]))
            return
        if self.history > 1:  # rotate: the oldest buffers receive the newest output
            entry.slots.insert(0, entry.slots.pop())
            entry.steps.insert(0, entry.steps.pop())
        for dst, src in zip(entry.slots[0], new):
            if dst is not None:
                dst.copy_(src)
        entry.steps[0] = step

    def replace(self, key: Hashable, out: Any, step: int = 0) -> None:
        """Store `out` in fresh buffers, leaving the old ones untouched (training: autograd may still read them)."""
        entry = self._store.pop(key, None)
        if entry is not None:
            self.bytes -= sum(_nbytes(s) for s in entry.slots)
        self.put(key, out, step)

    def _grow(self, n: int) -> None:
        self.bytes += n
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def get(self, key: Hashable, batch: int | None = None) -> Any | None:
        """The newest cached output for `key`, or None if absent or stored for another batch size."""
        entry = self._store.get(key)
        if entry is None or not _fits(entry.slots[0], batch):
            return None
        return rebuild(entry.kind, entry.slots[0])

    def summed(self, keys: tuple, batch: int | None = None, slot: int = 0) -> torch.Tensor | None:
        """The sum of the newest tensors stored under `keys` (added in their order; `slot=1`: of the outputs before
        them), or None unless each is one tensor fitting `batch` with that slot filled. Kept until one of them is
        stored again: a run of blocks reused whole over several steps adds its residuals once, then one tensor per
        step."""
        entries = [self._store.get(k) for k in keys]
        if any(
            e is None or not issubclass(e.kind, torch.Tensor) or not _fits(e.slots[0], batch) or len(e.slots) <= slot
            for e in entries
        ):
            return None
        versions = tuple(e.version for e in entries)
        kept = self._sums.get((keys, slot))
        if kept is not None and kept[0] == versions:
            return kept[1]
        total = entries[0].slots[slot][0]
        for e in entries[1:]:
            total = total + e.slots[slot][0]
        if kept is not None:
            self.bytes -= _nbytes([kept[1]])
        self._sums[(keys, slot)] = (versions, total)
        self._grow(_nbytes([total]))
        return total

    def outputs(self, key: Hashable, batch: int | None = None) -> list:
        """The outputs stored for `key`, newest first (two at most, with `history=2`); empty if absent or stored for
        another batch size."""
        entry = self._store.get(key)
        if entry is None or not _fits(entry.slots[0], batch):
            return []
        return [rebuild(entry.kind, slot) for slot in entry.slots]

    def forecast(self, key: Hashable, step: int, batch: int | None = None) -> Any | None:
        """First-order Taylor extrapolation to `step` from the last two stored outputs (None without two)."""
        entry = self._store.get(key)
        if entry is None or len(entry.slots) < 2 or not _fits(entry.slots[0], batch):
            return None
        (s1, s0), (y1, y0) = entry.steps[:2], entry.slots[:2]
        w = (step - s1) / (s1 - s0)
        return rebuild(entry.kind, [None if a is None else a + (a - b) * w for a, b in zip(y1, y0)])

    def bound_bytes(self) -> int:
        """The analytic bound on this cache: one output per key it holds, times its history (2 for forecasts), plus
        the summed residuals kept per run of blocks reused as one (`+spans`; fitted runs keep the previous ones too)."""
        sums = sum(_nbytes([total]) for _, total in self._sums.values())
        return self.history * sum(_nbytes(e.slots[0]) for e in self._store.values()) + sums

    def clear(self) -> None:
        self._store.clear()
        self._sums.clear()
        self.bytes = 0

    def reset_peak(self) -> None:
        self.peak_bytes = self.bytes


def _clone(ts: list) -> list:
    return [None if t is None else t.detach().clone() for t in ts]


def _fits(bufs: list, batch: int | None) -> bool:
    first = next((b for b in bufs if b is not None), None)
    return batch is None or first is None or first.shape[0] == batch


def _same_layout(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        (x is None and y is None)
        or (x is not None and y is not None and x.shape == y.shape and x.dtype == y.dtype and x.device == y.device)
        for x, y in zip(a, b)
    )


def _nbytes(bufs: list) -> int:
    return sum(t.numel() * t.element_size() for t in bufs if t is not None)
