"""`diffroute bench scale`: plans timed on random-weight transformers built from the published configurations of the
models users run (PixArt-alpha/Sigma XL, SD3-medium, Sana 1.6B, FLUX.1-dev, DiT-XL), at their real resolution.

Static plans cost the same whatever the weights, so their speedups, the executor's overhead and the cache's size are
those of the real models. Dynamic plans decide from the weights' outputs: here the first-block policy follows a
fixed pattern (compute every third step) while doing all its usual work, so only its mechanics are timed. On a CPU
the default is a reduced depth per family (stated in the output); a step's cost is its embeddings and final layer
plus depth times one block, so per-block figures extrapolate linearly. On CUDA every family runs at full depth.
"""

from __future__ import annotations

import sys

# Blocks per block list on a CPU (the whole bench in about 15 minutes on 2 cores); CUDA runs the real depth.
CPU_BLOCKS = {
    "pixart-alpha-xl": (28,),
    "pixart-sigma-xl": (2,),
    "sd3-medium": (2,),
    "sana-1.6b": (2,),
    "flux-dev": (1, 1),
    "dit-xl": (28,),
}
STEPS = 6  # enough for every plan's pattern (FORA-3 computes steps 0 and 3); cost per step is what matters


def plans() -> dict:
    """The plans timed, by label (None: vanilla diffusers, no hooks)."""
    from diffroute.policies.first_block import FirstBlockPlan

    return {
        "vanilla": None,
        "full": "full",
        "fora-2": "fora-2",
        "fora-3": "fora-3",
        "fora-3+blocks": "fora-3+blocks",
        "fbcache@3": FirstBlockPlan(1, 0, 0.1, "fbcache@3", every=3),
        "taylor-3": "taylor-3",
    }


CACHE_KIND = {"fora-2": "components", "fora-3": "components", "fora-3+blocks": "blocks", "taylor-3": "history"}


class ScaleCase:
    """One family built for the bench: its random-weight transformer, one call's inputs and its FLOP count."""

    def __init__(self, name: str, device: str, dtype, blocks=None, steps: int = STEPS, resolution: int | None = None):
        import torch

        from diffroute.core.arch import architecture_map
        from diffroute.search.cost import count_flops
        from diffroute.zoo.real_configs import REAL_CONFIGS

        self.name, self.config, self.blocks, self.steps = name, REAL_CONFIGS[name], blocks, steps
        self.resolution = resolution or self.config.resolution
        self.dtype, self.device = dtype, device
        self.model = self.config.build(blocks, device=device, dtype=dtype)
        self.inputs = self.config.call_inputs(1, self.resolution, device=device, dtype=dtype)
        self.rows = self.config.rows(1)
        self._times = torch.linspace(999, 0, steps).tolist()
        one = dict(self.inputs, timestep=self.config.timestep(500, self.rows, device))
        self.cost = count_flops(self.model, architecture_map(self.model), (), one)

    def call_step(self, i: int) -> None:
        """Step `i` of a denoising run: one transformer call, as the family's pipeline makes it."""
        t = self.config.timestep(self._times[i], self.rows, self.device)
        self.model(**self.inputs, timestep=t, return_dict=False)

    def cache_formula(self, label: str) -> int | None:
        import torch

        kind = CACHE_KIND.get(label)
        element = torch.finfo(self.dtype).bits // 8
        return None if kind is None else self.config.cache_bytes(kind, 1, element, self.blocks, self.resolution)


def run_family(name: str, device: str, dtype, blocks=None, steps: int = STEPS, repeats: int = 2, resolution=None):
    """Time every plan on one family; returns its rows and what was built."""
    import torch

    from diffroute.metrics.step_timing import summarize, time_steps

    case = ScaleCase(name, device, dtype, blocks, steps, resolution)
    rc = case.config
    case.call_step(0)  # warm-up: one call per shape (allocator, kernel choices); no plan needs more
    results = time_steps(case.model, plans(), case.call_step, steps, repeats=repeats, warmup=0)
    table = summarize(results, case.cost)
    for label, row in table.items():
        row["cache_formula_bytes"] = case.cache_formula(label)
    element = torch.finfo(dtype).bits // 8
    return {
        "family": name,
        "hub_config": rc.hub_id,
        "model_class": rc.model_class,
        "blocks": list(blocks or rc.depth()),
        "full_depth": list(rc.depth()),
        "resolution": case.resolution,
        "image_tokens": rc.image_tokens(case.resolution),
        "text_tokens": rc.text_tokens,
        "rows_per_call": case.rows,
        "steps": steps,
        "repeats": repeats,
        "gflops_per_step": case.cost.step_flops / 1e9,
        "cache_formula_full_depth_bytes": {k: rc.cache_bytes(k, 1, element) for k in ("components", "blocks")},
        "plans": table,
    }


def run(args) -> dict:
    import torch

    from diffroute.runtime import set_threads
    from diffroute.zoo.real_configs import REAL_CONFIGS

    names = [f.strip() for f in args.families.split(",") if f.strip()] if args.families else list(REAL_CONFIGS)
    unknown = [n for n in names if n not in REAL_CONFIGS]
    if unknown:
        raise ValueError(f"--families: unknown {unknown}; known: {', '.join(REAL_CONFIGS)}")
    dtypes = [d.strip() for d in (args.dtypes or "bfloat16").split(",") if d.strip()]
    bad = [d for d in dtypes if d not in ("float32", "bfloat16", "float16")]
    if bad:
        raise ValueError(f"--dtypes: {bad} are not float32, bfloat16 or float16")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    set_threads(args.threads)
    depth = args.depth or ("full" if device.startswith("cuda") else "reduced")
    repeats = args.repeats or 2
    steps = args.steps or STEPS
    out = {"device": device, "threads": torch.get_num_threads(), "depth": depth, "families": []}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(device)
    for dtype_name in dtypes:
        for name in names:
            blocks = CPU_BLOCKS[name] if depth == "reduced" else None
            print(f"[{dtype_name}] {name}: building and timing {len(plans())} plans...", file=sys.stderr, flush=True)
            res = run_family(name, device, getattr(torch, dtype_name), blocks, steps, repeats)
            res["dtype"] = dtype_name
            out["families"].append(res)
            if not args.json:
                print_family(res)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_family(res: dict) -> None:
    blocks = "+".join(map(str, res["blocks"]))
    full = "+".join(map(str, res["full_depth"]))
    print(
        f"\n{res['family']} ({res['model_class']}, {res['hub_config']} config) {res['dtype']}: {blocks} of {full} "
        f"blocks, {res['resolution']} px = {res['image_tokens']} image + {res['text_tokens']} text tokens, "
        f"{res['rows_per_call']} rows per call, {res['gflops_per_step']:.0f} GFLOP per step, {res['steps']} steps, "
        f"median of {res['repeats']}"
    )
    print(
        "| plan | transformer s | speedup | FLOP-ideal | of ideal | reuse step / full step | cache (measured) | "
        "cache (formula) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, r in res["plans"].items():
        ideal = r["flop_ideal_speedup"]
        cache, formula = r["cache_bound_bytes"], r["cache_formula_bytes"]
        print(
            f"| {label} | {r['transformer_s']:.3f} | {r['speedup']:.2f}x | {ideal:.2f}x | {_pct(r['of_ideal'])} | "
            f"{_pct(r['reuse_step_vs_full'])} | {'-' if not cache else f'{cache / 2**20:.1f} MiB'} | "
            f"{'-' if formula is None else f'{formula / 2**20:.1f} MiB'} |"
        )


def print_summary(saved: dict) -> None:
    """One row per family and dtype: the README's table "at the scale users run"."""
    print(
        "| family | dtype | blocks | tokens (image + text) | full / vanilla | FORA-3 (of FLOP-ideal) | "
        "FORA-3+blocks (of ideal) | FBCache@3 | reuse step: components / whole blocks | cache = formula |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for f in saved["families"]:
        p = f["plans"]
        exact = all(r["cache_bound_bytes"] == r["cache_formula_bytes"] for r in p.values() if r["cache_formula_bytes"])
        blocks = "+".join(map(str, f["blocks"])) + ("" if f["blocks"] == f["full_depth"] else " (reduced)")
        print(
            f"| {f['family']} | {f['dtype']} | {blocks} | {f['image_tokens']} + {f['text_tokens']} | "
            f"{p['full']['transformer_s'] / p['vanilla']['transformer_s']:.3f} | "
            f"{p['fora-3']['speedup']:.2f}x ({_pct(p['fora-3']['of_ideal'])}) | "
            f"{p['fora-3+blocks']['speedup']:.2f}x ({_pct(p['fora-3+blocks']['of_ideal'])}) | "
            f"{p['fbcache@3']['speedup']:.2f}x | {_pct(p['fora-3']['reuse_step_vs_full'])} / "
            f"{_pct(p['fora-3+blocks']['reuse_step_vs_full'])} | {'yes' if exact else 'NO'} |"
        )


if __name__ == "__main__":  # `python -m diffroute.cli.bench_scale [--summary] RESULTS.json`: tables of a --json run
    import json
    from pathlib import Path

    saved = json.loads(Path(sys.argv[-1]).read_text())
    if "--summary" in sys.argv:
        print_summary(saved)
    else:
        print(f"device {saved['device']} {saved.get('gpu', '')}, depth {saved['depth']}, {saved['threads']} threads")
        for family in saved["families"]:
            print_family(family)
