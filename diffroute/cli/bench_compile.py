"""`bench compile`: eager vs torch.compile, vanilla vs plans, per dtype, side by side in one run (not a test).

Per row it prints end-to-end and transformer wall-clock (median of the repeats after a warm-up; the transformer
speedup over eager vanilla paired as `--pairing` says, as in `bench overhead`), the graphs dynamo
compiled for the row at its first call, its graph breaks, and the graphs compiled after the first call
(recompilations: 0 for a static plan). The graph-break reasons are listed below the tables.
"""

from __future__ import annotations

import re
import sys
from collections import Counter


class _CompileSwitch:
    """Compiles the transformer (or its blocks) once and switches each row between the compiled and eager call."""

    def __init__(self, pipe, mode: str, backend: str):
        from diffroute.runtime.compiling import compile_transformer

        self.transformer, self.timer = pipe.transformer, None  # the timer, once it wraps the compiled call
        self.modules = compile_transformer(pipe, mode, backend=backend)
        self.impls = [m._compiled_call_impl for m in self.modules]

    def set(self, on: bool) -> None:
        for m, impl in zip(self.modules, self.impls):
            if m is self.transformer:
                self.timer.inner = impl if on else None  # the timer wraps the transformer's call: switch inside it
            else:
                m._compiled_call_impl = impl if on else None

    def remove(self) -> None:
        self.set(False)
        for m in self.modules:
            m._compiled_call_impl = None


class _GraphCounts:
    """Dynamo's counters around each row's calls: graphs and breaks at its first call, graphs compiled later."""

    def __init__(self, rows, switch: _CompileSwitch, reasons: Counter):
        import torch

        self.counters = torch._dynamo.utils.counters
        self.switch, self.reasons = switch, reasons
        self.rows = {r: {"first_call_graphs": 0, "graph_breaks": 0, "recompiled_graphs": 0} for r in rows}

    def _now(self) -> tuple[int, Counter]:
        return self.counters["stats"]["unique_graphs"], Counter(self.counters["graph_break"])

    def before(self, row: str) -> None:
        self.switch.set(row.startswith("compiled"))
        self.mark = self._now()

    def after(self, row: str, timed: bool) -> None:
        graphs, breaks = self._now()
        new_graphs, new_breaks = graphs - self.mark[0], breaks - self.mark[1]
        if timed:
            self.rows[row]["recompiled_graphs"] += new_graphs
        else:
            self.rows[row].update(first_call_graphs=new_graphs, graph_breaks=sum(new_breaks.values()))
            self.reasons.update(new_breaks)


def run(args, pipe, names: list[str], call) -> dict:
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    out = {"model": args.model, "device": str(pipe.device), "batch": args.batch, "steps": args.steps}
    out.update(compile_mode=args.compile_mode, backend=args.backend, repeats=args.repeats, pairing=args.pairing)
    out["tables"] = {}
    reasons: Counter = Counter()
    for dtype in dtypes:
        out["tables"][dtype] = table = _time_dtype(args, pipe, names, call, dtype, reasons)
        if not args.json:
            _print(dtype, table, args)
    out["graph_break_reasons"] = dict(_summed(reasons))
    if not args.json:
        print("graph breaks (reason: count over all first calls):")
        for k, v in out["graph_break_reasons"].items():
            print(f"  {v:4d}  {k}")
    return out


def _short(reason: str) -> str:
    """Dynamo's reason text, shortened to its first line and the function it names."""
    lines = reason.splitlines()
    where = re.sub(r" at 0x[0-9a-f]+", "", next((x.strip() for x in lines if "debug context" in x), ""))
    return f"{lines[0][:100]} ({where[:120]})" if where else lines[0][:160]


def _summed(reasons: Counter) -> Counter:
    out: Counter = Counter()
    for k, v in reasons.items():
        out[_short(k)] += v
    return out


def _time_dtype(args, pipe, names, call, dtype: str, reasons: Counter) -> dict:
    import torch

    from diffroute.metrics.timing import CallTimer, speedups, time_plans
    from diffroute.utils.quiet import cast_pipeline

    torch._dynamo.reset()
    cast_pipeline(pipe, getattr(torch, dtype))
    switch = _CompileSwitch(pipe, args.compile_mode, args.backend)
    switch.timer = timer = CallTimer(pipe.transformer)
    plans = {
        f"{kind} {n}": (None if n == "vanilla" else n) for kind in ("eager", "compiled") for n in ["vanilla", *names]
    }
    counts = _GraphCounts(plans, switch, reasons)
    print(f"{dtype}: {len(plans)} rows x {args.repeats} repeats (+1 warm-up, which compiles)", file=sys.stderr)
    try:
        res = time_plans(
            pipe,
            plans,
            call,
            repeats=args.repeats,
            before=counts.before,
            after=counts.after,
            timer=timer,
            neighbours="eager vanilla" if args.pairing == "neighbours" else None,
            progress=True,
        )
    finally:
        timer.remove()
        switch.remove()
    base = res["eager vanilla"]
    table = {}
    for row, r in res.items():
        speed = speedups(base, r)  # eager vanilla against itself: exactly 1
        quartiles = {k: v for k, v in speed.items() if k.startswith("speedup_transformer_q")}
        table[row] = {
            "end_to_end_median_s": r["e2e_median_s"],
            "transformer_median_s": r["transformer_median_s"],
            "speedup_transformer_vs_eager_vanilla": speed["speedup_transformer"],
            **quartiles,
            "computed_fraction": r["computed_fraction"],
            **counts.rows[row],
        }
    return table


def _print(dtype: str, table: dict, args) -> None:
    paired = "eager vanilla either side" if args.pairing == "neighbours" else "eager vanilla once per repeat"
    print(
        f"\n{args.model} {dtype}, batch {args.batch}, {args.steps} steps, compile={args.compile_mode} "
        f"({args.backend}), median of {args.repeats} ({paired})"
    )
    head = ("row", "e2e s", "xf s", "xf speedup", "computed", "graphs", "breaks", "recomp")
    print("{:>18} {:>7} {:>7} {:>10} {:>8} {:>6} {:>6} {:>6}".format(*head))
    for row, r in table.items():
        print(
            f"{row:>18} {r['end_to_end_median_s']:7.3f} {r['transformer_median_s']:7.3f} "
            f"{r['speedup_transformer_vs_eager_vanilla']:9.2f}x {r['computed_fraction']:8.3f} "
            f"{r['first_call_graphs']:6d} {r['graph_breaks']:6d} {r['recompiled_graphs']:6d}"
        )
