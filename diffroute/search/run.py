"""ECAD's Python entry point: `run_search(pipe, prompts, settings, out)` searches Pareto-optimal compute schedules
for a loaded pipeline with NSGA-II (cost vs quality against full compute), checkpointed in `out` and resumable;
`pick_from` picks a front member within a cost budget. The zoo seeds searches with its routers and installs front
members as shipped schedules (`zoo.shipped.zoo_seeds`, `ship_front`). The `diffroute search` command only parses
its arguments into `SearchSettings`, loads the pipeline and calls these."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from diffroute.errors import InputError

QUALITIES = ("fd", "psnr", "psnr_mean", "clip")
COSTS = ("cost", "latency_model", "latency")


@dataclass
class SearchSettings:
    """One search's settings; those that change what is evaluated also name the run (`settings.json`)."""

    model: str  # the name the pipeline was loaded by (zoo name, folder or hub id): seeds and shipping read it
    steps: int = 20
    seed: int = 0
    pop: int = 24
    generations: int = 10
    quality: str = "fd"  # fd | psnr | psnr_mean | clip
    cost: str = "cost"  # cost (analytic FLOPs) | latency_model | latency
    forecast: bool = True
    whole_blocks: bool = False
    whole_always: bool = False  # every block whose cells all reuse is reused whole, no gene (`PLAN+blocks`'s rule)
    thresholds: bool = False  # per-step first-block check thresholds in the genome (dynamic per image)
    check_per: str = "prompt"  # what one check decides: sample, prompt (an image's CFG pair) or batch
    bac: bool = True  # seed the population with BAC schedules
    patience: int = 3
    budget_minutes: float = 0.0
    features: str = "emoji-clip"
    call_kwargs: dict = field(default_factory=dict)
    overwrite: bool = False
    clip_scorer: Callable | None = None  # for quality "clip": the model's CLIP score (the zoo's emoji-CLIP)
    # prompts on which each candidate's reuses are fitted before it is scored (empty: scored as plain reuse)
    fit_prompts: list[str] = field(default_factory=list)

    def check(self, n_prompts: int) -> None:
        """Refuse settings that cannot search, before any work."""
        if self.pop < 4 or self.generations < 1 or n_prompts < 2:
            raise InputError("a search needs a population (--pop) of at least 4, 1 generation and 2 prompts (--n).")
        if self.steps < 2:
            raise InputError("--steps must be at least 2: at one step everything computes, there is nothing to search.")
        if self.quality not in QUALITIES:
            raise InputError(f"unknown quality objective {self.quality!r}; known: {', '.join(QUALITIES)}.")
        if self.cost not in COSTS:
            raise InputError(f"unknown cost objective {self.cost!r}; known: {', '.join(COSTS)}.")
        if self.fit_prompts and (self.forecast or self.thresholds):
            raise InputError(
                "a fitted search (--fitted) scores static schedules whose reuses are fitted extrapolations: leave out "
                "--thresholds (checked plans are not fitted) and search without forecast genes (--no-forecast; a "
                "fitted reuse is a forecast whose weights are learned)."
            )


def run_search(
    pipe, prompts: list[str], settings: SearchSettings, out: Path, state=None, seeds: list = ()
) -> dict | None:
    """Search, save the front (`out/front/*.json`, `out/front.png`) and return its summary (None off rank 0).
    `seeds`: schedules put into the first population (`zoo.shipped.zoo_seeds` for a shipped model)."""
    import torch
    from accelerate import PartialState

    import diffroute
    from diffroute.search.cost import measure_cost
    from diffroute.search.evaluate import ScheduleEvaluator
    from diffroute.search.front import pareto_front, plot_front, save_front
    from diffroute.search.genome import GenomeSpace
    from diffroute.search.nsga import Search, SearchConfig

    settings.check(len(prompts))
    state = state or PartialState(cpu=not torch.cuda.is_available())
    out = Path(out)
    kwargs = {**settings.call_kwargs, "num_inference_steps": settings.steps}
    pipe.set_progress_bar_config(disable=True)
    arch = diffroute.architecture_map(pipe.transformer)
    feature = None
    if settings.quality == "fd":
        from diffroute.metrics.features import feature_extractor

        feature = feature_extractor(settings.features)
    check_resume(settings, pipe, prompts, kwargs, out, state)  # (a changed setting is named first)
    scorer = settings.clip_scorer
    if settings.quality == "clip" and scorer is None:
        raise InputError(f"quality clip needs a model with a CLIP scorer (emoji); {settings.model!r} has none.")
    cost = measure_cost(pipe, arch, kwargs)
    latency_model, check = None, None
    if settings.cost == "latency_model":
        latency_model, check = _latency_model(pipe, arch, prompts, kwargs, settings, state)
    evaluator = ScheduleEvaluator(
        pipe,
        prompts,
        settings.seed,
        kwargs,
        cost,
        feature,
        clip_scorer=scorer,
        latency_model=latency_model,
        fit_prompts=settings.fit_prompts,
    )
    space = GenomeSpace(
        arch,
        settings.steps,
        forecast=settings.forecast,
        whole_blocks=settings.whole_blocks,
        whole_always=settings.whole_always,
        thresholds=settings.thresholds,
        check_per=settings.check_per,
    )
    cfg = SearchConfig(
        pop_size=settings.pop,
        generations=settings.generations,
        seed=settings.seed,
        quality=settings.quality,
        cost=settings.cost,
        patience=settings.patience,
        budget_minutes=settings.budget_minutes,
    )
    seeds = list(seeds)
    if settings.bac:
        seeds += _bac_seeds(pipe, arch, prompts, kwargs, settings)
    search = Search(space, evaluator, cfg, out, state, seeds=seeds)
    run = search.run()
    if not state.is_main_process:
        return None
    records = search.archive()
    front = pareto_front(records, settings.quality, settings.cost)
    saved = {
        "model": settings.model,
        "steps": settings.steps,
        "calibration_prompts": len(prompts),
        "pop": settings.pop,
        "generations": settings.generations,
        "quality_objective": settings.quality,
        "cost_objective": settings.cost,
        "features": settings.features,
        **({"fitted_on_prompts": len(settings.fit_prompts)} if settings.fit_prompts else {}),
    }
    paths = save_front(front, space, out, saved)
    title = f"{settings.model}: {len(records)} schedules evaluated, {len(front)} on the front"
    plot_front(records, front, settings.quality, settings.cost, out / "front.png", title)
    return {
        "out": str(out),
        "evaluated": len(records),
        "generations_run": run["generation"],
        "hypervolume": run["hypervolume"],
        "search_seconds": round(run["seconds"], 1),
        "stopped_by": run["stopped_by"],
        "latency_model_check": check,
        "latency_table": None if latency_model is None else latency_model.to_dict(),  # (what priced the front)
        "front": [{k: v for k, v in r.items() if k != "genome"} | {"file": str(p)} for r, p in zip(front, paths)],
    }


def pick_from(result: dict, max_cost: float, settings: SearchSettings) -> str | None:
    """The front file of the best quality within `max_cost` (None: no member is that cheap)."""
    from diffroute.search.front import pick

    i = pick(result["front"], max_cost, settings.quality, settings.cost)
    return None if i is None else result["front"][i]["file"]


def _calls(pipe, prompts, kwargs, seed):
    from diffroute.utils.seeding import sample_generators

    def call():
        gens = sample_generators(seed, range(len(prompts)), pipe.device)
        pipe(prompts, generator=gens, output_type="latent", **kwargs)

    return call


def _latency_model(pipe, arch, prompts, kwargs, settings: SearchSettings, state):
    """Measure the latency table on this device and check it: predicted vs measured transformer speedups of FORA-2,
    FORA-3 and TaylorSeer-3 (printed; the issue's bar is agreement within 10%)."""
    from diffroute.core.schedule import Schedule
    from diffroute.search.cost import measure_latency, transformer_times

    call = _calls(pipe, prompts, kwargs, settings.seed)
    model = measure_latency(pipe, arch, call, settings.steps, fitted=bool(settings.fit_prompts))
    checked = {
        "fora-2": Schedule.fora(arch, settings.steps, 2),
        "fora-3": Schedule.fora(arch, settings.steps, 3),
        "taylor-3": Schedule.fora(arch, settings.steps, 3).with_forecasts(),
    }
    times = transformer_times(pipe, {"full": "full", **checked}, call)
    check = {}
    for name, sched in checked.items():
        predicted, measured = 1 / model.relative(sched), times["full"] / times[name]
        check[name] = {"predicted_speedup": predicted, "measured_speedup": measured, "error": predicted / measured - 1}
        if state.is_main_process:
            print(
                f"latency model: {name} predicted {predicted:.2f}x, measured {measured:.2f}x "
                f"({check[name]['error']:+.1%})",
                file=sys.stderr,
            )
    return model, check


def _bac_seeds(pipe, arch, prompts, kwargs, settings: SearchSettings):
    """BAC schedules from one `full` call on the first 8 calibration prompts (memory: every component output of every
    step is kept for the similarity tables)."""
    import diffroute
    from diffroute.search.bac import bac_schedules, similarity_tables

    diffroute.remove(pipe)
    table = similarity_tables(pipe, arch, _calls(pipe, prompts[:8], kwargs, settings.seed), settings.steps)
    return bac_schedules(arch, table)


def _whole_blocks_setting(settings: SearchSettings) -> dict:
    """The fingerprint's whole-block entry: none without them (settings of earlier runs unchanged)."""
    if settings.whole_always:
        return {"whole_blocks": "always"}
    return {"whole_blocks": True} if settings.whole_blocks else {}


def check_resume(settings: SearchSettings, pipe, prompts, kwargs, out: Path, state) -> None:
    """Evaluations in `out` are reused only if made with the same model, prompts, seeds, steps and objectives (more
    generations may be asked for: that extends the search)."""
    import shutil

    import diffroute
    from diffroute.core.executor import NUMERICS
    from diffroute.utils.fingerprint import check_or_record_all, digest, weights_digest

    if settings.overwrite and state.is_main_process:
        for child in out.iterdir():  # everything but the lock this run holds on the folder
            if child.name != ".lock":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    state.wait_for_everyone()
    fingerprint = {
        "diffroute": diffroute.__version__,
        "executor_numerics": NUMERICS,
        "model": settings.model,
        "weights": weights_digest(pipe),
        "steps": settings.steps,
        "seed": settings.seed,
        "prompts": digest(prompts),
        "call_kwargs": digest(kwargs),
        "quality": settings.quality,
        "cost": settings.cost,
        "forecast": settings.forecast,
        **_whole_blocks_setting(settings),
        **({"thresholds": True} if settings.thresholds else {}),
        **({"check_per": settings.check_per} if settings.thresholds and settings.check_per != "prompt" else {}),
        **({"fit_prompts": digest(settings.fit_prompts)} if settings.fit_prompts else {}),
        "bac": settings.bac,
        "features": settings.features if settings.quality == "fd" else None,
        "pop": settings.pop,
    }
    fix = "Use a new --out, or pass --overwrite to discard that search."
    check_or_record_all([(out / "settings.json", fingerprint, "search")], fix, state)
