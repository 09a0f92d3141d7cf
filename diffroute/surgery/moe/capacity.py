"""Timestep-dependent expert capacity `k(t)`: the mean number of routed experts per token at timestep t.

Each routed expert takes `C = ceil(k(t) * S / E)` tokens of every sample (S tokens, E experts), so k = E is the
dense FFN and the routed FLOPs scale with k. Schedules (EC-DLM's family, read on the image timestep):
`static:K`, clean-heavy `clean:KMIN-KMAX` (k = KMIN + (1 - t/T)(KMAX - KMIN): most capacity near the clean end,
EC-DLM's winner), noise-heavy `noise:KMIN-KMAX` (the mirror image), and `table:K0,K1,...` (k per equal bin of t/T,
from the noisy end t/T = 1 to the clean end 0, the order a sampler visits them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from diffroute.errors import PlanError

KINDS = ("static", "clean", "noise", "table")


@dataclass(frozen=True)
class Capacity:
    """A named k(t) schedule; `t_frac` is t / T in [0, 1] (1 = pure noise)."""

    kind: str
    values: tuple[float, ...]

    def k(self, t_frac: float) -> float:
        s = min(max(float(t_frac), 0.0), 1.0)
        if self.kind == "static":
            return self.values[0]
        if self.kind == "table":
            n = len(self.values)
            return self.values[min(int((1.0 - s) * n), n - 1)]
        lo, hi = self.values
        return lo + ((1.0 - s) if self.kind == "clean" else s) * (hi - lo)

    def check(self, num_experts: int) -> None:
        bad = [v for v in self.values if not 0 < v <= num_experts]
        if bad:
            raise PlanError(
                f"capacity {self} asks for {bad[0]} experts per token; it must lie in (0, {num_experts}] "
                f"(the number of routed experts)."
            )

    def __str__(self) -> str:
        if self.kind in ("static",):
            return f"static:{self.values[0]:g}"
        if self.kind == "table":
            return "table:" + ",".join(f"{v:g}" for v in self.values)
        return f"{self.kind}:{self.values[0]:g}-{self.values[1]:g}"


def tokens_per_expert(k: float, seq_len: int, num_experts: int) -> int:
    """Tokens each expert takes per sample at k experts per token: ceil(k * S / E), between 1 and S."""
    return min(seq_len, max(1, math.ceil(k * seq_len / num_experts - 1e-9)))


def parse_capacity(spec: str | float | Capacity) -> Capacity:
    """`2`, `static:2`, `clean:1-3`, `noise:1-3`, `table:6,4,2,2` -> Capacity (PlanError on anything else)."""
    if isinstance(spec, Capacity):
        return spec
    if isinstance(spec, int | float):
        return Capacity("static", (float(spec),))
    text = str(spec).strip()
    kind, _, rest = text.partition(":") if ":" in text else ("static", "", text)
    try:
        if kind == "static":
            return Capacity(kind, (float(rest),))
        if kind in ("clean", "noise"):
            lo, hi = (float(v) for v in rest.split("-"))
            return Capacity(kind, (lo, hi))
        if kind == "table":
            values = tuple(float(v) for v in rest.split(","))
            if values:
                return Capacity(kind, values)
    except ValueError:
        pass
    raise PlanError(
        f"capacity {text!r} is not understood; use static:K, clean:KMIN-KMAX, noise:KMIN-KMAX or table:K0,K1,... "
        f"(K = routed experts per token, e.g. static:2)."
    )
