"""`diffroute eval compare`: for each plan, with the same prompts and seeds, generate (sharded across processes,
resumable), time it, and score it against real references and against the `full` plan."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from torchmetrics.aggregation import SumMetric
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from diffroute.eval.peers import activate, call_counts, check_spec, deactivate, flop_counts, is_peer, peer_timing
from diffroute.metrics import frechet
from diffroute.metrics.clipscore import ClipScore
from diffroute.metrics.fidelity import (
    PerImageMSE,
    paired_psnr_difference,
    psnr_summary,
    ssim_metric,
    update_fidelity,
)
from diffroute.metrics.images import load_uint8
from diffroute.utils.imageio import save_png, to_pil
from diffroute.utils.io import atomic_write_json
from diffroute.utils.seeding import sample_generators


@dataclass
class CompareConfig:
    model: str
    plans: list[str]
    prompts: list[str]
    out: Path
    n: int = 256
    seed: int = 0
    steps: int = 20
    guidance: float | None = None
    batch: int = 16
    repeats: int = 5
    features: str | None = None  # FD feature space; None: no FD
    clip: str | None = None  # CLIP scorer; None: no CLIP score
    reference: torch.Tensor | None = None  # real images (uint8 NCHW) for FD against reality
    paired_with: str | None = None  # a plan of `plans`: every plan's per-image PSNR difference to it, with a band
    pairing: str = "repeat"  # speedups against `full` timed in the same repeat, or in the runs either side of each
    call_kwargs: dict = field(default_factory=dict)


def slug(plan: str) -> str:
    name = Path(plan).stem if plan.endswith(".json") else plan
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _chunks(n: int, batch: int) -> list[list[int]]:
    """Fixed batches of global indices: the same batches whatever the number of processes (so the same images)."""
    return [list(range(k, min(k + batch, n))) for k in range(0, n, batch)]


def validate(cfg: CompareConfig) -> None:
    """Everything that can be checked before any work: plans, counts, duplicates, the `full` baseline."""
    if cfg.n < 2:
        raise ValueError(f"--n must be at least 2 (metrics need two samples), got {cfg.n}.")
    if cfg.n > len(cfg.prompts):
        raise ValueError(f"--n {cfg.n} asks for more samples than the {len(cfg.prompts)} prompts given.")
    slugs = [slug(p) for p in cfg.plans]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"plans repeat (or share a file name): {cfg.plans}")
    if "full" not in cfg.plans:
        cfg.plans.insert(0, "full")  # the reference for PSNR/SSIM/FD-vs-full and speedups
    for p in cfg.plans:
        check_spec(p)
    if cfg.pairing not in ("repeat", "neighbours"):  # else a misspelt one would fall back to "repeat" unnoticed
        raise ValueError(f"pairing {cfg.pairing!r}: 'repeat' or 'neighbours'.")
    if cfg.paired_with is not None and cfg.paired_with not in cfg.plans:
        raise ValueError(f"--paired-with {cfg.paired_with}: not one of --plans; add it there.")


FIX = "Use a new --out, or pass --overwrite to discard the images there."


def run_fingerprint(pipe, cfg: CompareConfig) -> dict:
    """Everything that determines the images of every plan (besides the plan itself)."""
    import diffroute
    from diffroute.utils.fingerprint import digest, weights_digest

    return {
        "diffroute": diffroute.__version__,
        "model": cfg.model,
        "weights": weights_digest(pipe),
        "steps": cfg.steps,
        "seed": cfg.seed,
        "batch": cfg.batch,
        "n": cfg.n,
        # on some CPUs the pixels depend on the intra-op thread count (runtime.set_threads): never mix counts
        "threads_per_process": torch.get_num_threads() if pipe.device.type == "cpu" else None,
        "prompts": digest(cfg.prompts[: cfg.n]),
        "call_kwargs": digest(cfg.call_kwargs),
    }


def plan_fingerprint(pipe, spec: str) -> dict:
    """What a plan spec means now: for our plans, the schedule/calibration content; for peers, library versions."""
    import diffroute

    if is_peer(spec):
        from importlib.metadata import PackageNotFoundError, version

        def v(pkg):
            try:
                return version(pkg)
            except PackageNotFoundError:
                return None

        return {"plan": spec, "diffusers": v("diffusers"), "cache-dit": v("cache-dit")}
    from diffroute.core.executor import NUMERICS

    content = diffroute.resolve_plan(spec).content(diffroute.architecture_map(pipe.transformer))
    return {**content, "executor_numerics": NUMERICS}


def generate_all(pipe, cfg: CompareConfig, state: PartialState) -> None:
    """Generate every plan's images this process owns; chunks already on disk are skipped (resume), but only when
    they were made with the same settings (fingerprints; a mismatch is refused before any work)."""
    from diffroute.utils.fingerprint import check_or_record_all

    chunks = _chunks(cfg.n, cfg.batch)
    root = cfg.out / "images"
    records = [(root / "run.json", run_fingerprint(pipe, cfg), "eval compare images")]
    records += [(root / slug(p) / "plan.json", plan_fingerprint(pipe, p), f"plan {p!r}") for p in cfg.plans]
    check_or_record_all(records, FIX, state)
    cost = cost_model(pipe, cfg)
    for plan in cfg.plans:
        folder = root / slug(plan)
        activate(pipe, plan)
        with state.split_between_processes(chunks) as mine:
            bar = tqdm(mine, desc=f"generate {slug(plan)}", file=sys.stderr, disable=not state.is_main_process)
            for chunk in bar:
                meta = folder / f"chunk-{chunk[0]:06d}.json"
                if meta.is_file():
                    continue
                gens = sample_generators(cfg.seed, chunk, pipe.device)
                images = pipe(
                    [cfg.prompts[i] for i in chunk], generator=gens, output_type="np", **cfg.call_kwargs
                ).images
                for i, img in zip(chunk, to_pil(images)):
                    save_png(img, folder / f"{i:06d}.png")
                executed, total = call_counts(pipe)
                done, flops = flop_counts(pipe, cost)
                record = {"computed_calls": executed, "component_calls": total}
                atomic_write_json(meta, {**record, "computed_flops": done, "all_flops": flops})
    deactivate(pipe)
    state.wait_for_everyone()


def cost_model(pipe, cfg: CompareConfig):
    """FLOPs of each component and of the rest of the transformer, counted once on a one-prompt call."""
    import diffroute
    from diffroute.search.cost import measure_cost

    deactivate(pipe)
    return measure_cost(pipe, diffroute.architecture_map(pipe.transformer), cfg.call_kwargs)


def _load(folder: Path, indices: list[int]) -> torch.Tensor:
    return load_uint8([folder / f"{i:06d}.png" for i in indices])


def score_all(cfg: CompareConfig, state: PartialState) -> tuple[dict[str, dict], tuple | None]:
    """Metrics of every plan; each process updates with its share, torchmetrics reduces the states."""
    from diffroute.metrics.features import feature_extractor

    device = state.device
    feature = feature_extractor(cfg.features) if cfg.features else None
    scorer = None
    if cfg.clip:
        from diffroute.metrics.clipscore import scorer as make_scorer

        scorer = make_scorer(cfg.clip)
    chunks = _chunks(cfg.n, cfg.batch)
    full_dir = cfg.out / "images" / "full"
    ref_stats = full_stats = ref_feats = full_feats = None
    if feature is not None:
        if cfg.reference is not None:
            m, bank = frechet.new_metric(feature).to(device), frechet.FeatureBank(feature).to(device)
            ref_idx = list(range(len(cfg.reference)))
            with state.split_between_processes(ref_idx) as mine:
                if mine:
                    frechet.update(m, cfg.reference[mine], real=True)
                    bank.update(cfg.reference[mine], mine)
            ref_stats, ref_feats = frechet.stats_of(m, True, feature), bank.compute().cpu()
        m, bank = frechet.new_metric(feature).to(device), frechet.FeatureBank(feature).to(device)
        with state.split_between_processes(chunks) as mine:
            for chunk in mine:
                imgs = _load(full_dir, chunk)
                frechet.update(m, imgs, real=True)
                bank.update(imgs, chunk)
        full_stats, full_feats = frechet.stats_of(m, True, feature), bank.compute().cpu()
    results, per_image_mse = {}, {}
    for plan in cfg.plans:
        folder = cfg.out / "images" / slug(plan)
        fd_m = frechet.new_metric(feature).to(device) if feature is not None else None
        bank = frechet.FeatureBank(feature).to(device) if feature is not None else None
        # KID against the full images on all n samples at once (one subset): no random subsets, so the value does
        # not depend on the order in which processes gathered the features.
        kid_m = KernelInceptionDistance(feature, subsets=1, subset_size=cfg.n).to(device) if feature else None
        clip_m = ClipScore(scorer).to(device) if scorer is not None else None
        mse_m, ssim_m = PerImageMSE().to(device), ssim_metric().to(device)
        computed, total, done, flops = (SumMetric().set_dtype(torch.float64).to(device) for _ in range(4))
        kid_fake, kid_real = [], []
        with state.split_between_processes(chunks) as mine:
            for chunk in mine:
                imgs = _load(folder, chunk)
                if fd_m is not None:
                    frechet.update(fd_m, imgs, real=False)
                    bank.update(imgs, chunk)
                    kid_fake.append(imgs)
                    kid_real.append(_load(full_dir, chunk))
                if clip_m is not None:
                    clip_m.update(imgs, [cfg.prompts[i] for i in chunk])
                update_fidelity(mse_m, ssim_m, imgs, _load(full_dir, chunk), chunk)
                meta = json.loads((folder / f"chunk-{chunk[0]:06d}.json").read_text())
                computed.update(meta["computed_calls"])
                total.update(meta["component_calls"])
                done.update(meta.get("computed_flops", float("nan")))  # (chunks made before FLOPs were recorded)
                flops.update(meta.get("all_flops", float("nan")))
        r = {"computed_fraction": float(computed.compute() / total.compute())}
        share = float(done.compute() / flops.compute())
        r["computed_flop_share"] = share if share == share else None
        r["flop_ideal_speedup"] = 1.0 / share if share == share and share > 0 else None
        per_image_mse[plan] = mse_m.compute().cpu()
        r.update(psnr_summary(per_image_mse[plan]))  # pooled and per-image mean, with bootstrap intervals
        r["ssim_vs_full"] = float(ssim_m.compute())
        if clip_m is not None:
            r["clip_score"] = float(clip_m.compute())
        if fd_m is not None:
            stats = frechet.stats_of(fd_m, False, feature)
            r["fd_vs_full"] = frechet.fd_from_stats(full_stats, stats)["value"]
            feats = bank.compute().cpu()  # bootstrap bands over images (paired with full's by seed)
            r["fd_vs_full_ci95"] = frechet.fd_interval(feats, full_feats, paired=True)
            if kid_fake:  # one update per process: torchmetrics gathers list states of equal length only
                kid_m.update(torch.cat(kid_fake), real=False)
                kid_m.update(torch.cat(kid_real), real=True)
            r["kid_vs_full"] = float(kid_m.compute()[0])
            if ref_stats is not None:
                r["fd_vs_real"] = frechet.fd_from_stats(ref_stats, stats)["value"]
                r["fd_vs_real_ci95"] = frechet.fd_interval(feats, ref_feats, paired=False)
        results[plan] = r
    if cfg.paired_with is not None:
        for plan, r in results.items():
            r["paired_with"] = cfg.paired_with
            r.update(paired_psnr_difference(per_image_mse[plan], per_image_mse[cfg.paired_with]))
    if "full" in results and results["full"].get("kid_vs_full") is not None:
        # The unbiased KID of identical paired sets is not 0 (it dips below 0): report each plan's KID relative to
        # that of `full` against itself, which is what "vs full" should mean.
        anchor = results["full"]["kid_vs_full"]
        for r in results.values():
            r["kid_vs_full_anchored"] = r["kid_vs_full"] - anchor
    info = None if feature is None else (getattr(feature, "extractor_id", None), getattr(feature, "resize", None))
    return results, info


def time_all(pipe, cfg: CompareConfig, state: PartialState) -> dict[str, dict]:
    """Medians of end-to-end and transformer time per plan, on the main process, plans interleaved; with the FLOPs
    of the timed calls (the same prompts as the times)."""
    from diffroute.metrics.timing import time_plans

    out = {}
    if state.is_main_process:
        k = min(cfg.batch, cfg.n)
        prompts = cfg.prompts[:k]

        def call():
            gens = sample_generators(cfg.seed, range(k), pipe.device)
            pipe(prompts, generator=gens, output_type="np", **cfg.call_kwargs)

        pipe.set_progress_bar_config(disable=True)
        print(f"timing {len(cfg.plans)} plans x {cfg.repeats} repeats on a batch of {k}...", file=sys.stderr)
        cost = cost_model(pipe, cfg)
        out = time_plans(
            pipe,
            {p: p for p in cfg.plans},
            call,
            repeats=cfg.repeats,
            flops=lambda p: flop_counts(p, cost),
            neighbours="full" if cfg.pairing == "neighbours" else None,
            progress=True,
            **peer_timing(),
        )
    state.wait_for_everyone()
    return out


def run_compare(pipe, cfg: CompareConfig) -> dict | None:
    """The whole comparison; returns the results on the main process (None elsewhere)."""
    from diffroute.metrics.timing import speedups

    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: gloo across CPU processes
    pipe.set_progress_bar_config(disable=True)
    generate_all(pipe, cfg, state)
    times = time_all(pipe, cfg, state)
    scores, feature_info = score_all(cfg, state)
    if not state.is_main_process:
        return None
    base = times["full"]
    rows = {}
    for plan in cfg.plans:
        t = times[plan]
        rows[slug(plan)] = row = {
            "plan": plan,
            "end_to_end_median_s": t["e2e_median_s"],
            "transformer_median_s": t["transformer_median_s"],
            **speedups(base, t),
            **scores[plan],
        }
        if "flops" in t:  # the FLOP share of the timed calls (the first batch of prompts), beside that of all n
            done, flops = t["flops"]
            row["timed_flop_share"] = done / flops
        elif plan == "full":
            row["timed_flop_share"] = 1.0
        # Computing a share f of the FLOPs cannot make the transformer faster than 1/f (the FLOP-ideal; the call
        # count's 1/f where FLOPs were not recorded): above that the measurement is timing noise, not a result.
        ideal = row.get("flop_ideal_speedup")
        if ideal is None:
            ideal = 1.0 / row["computed_fraction"] if row["computed_fraction"] > 0 else float("inf")
        row["speedup_above_ideal"] = row["speedup_transformer"] > ideal
        if row["speedup_above_ideal"]:
            print(
                f"warning: {plan}: measured transformer speedup {row['speedup_transformer']:.2f}x exceeds its "
                f"FLOP-ideal {ideal:.2f}x: timing noise; use more --repeats or a larger --batch.",
                file=sys.stderr,
            )
    result = {
        "model": cfg.model,
        "n": cfg.n,
        "steps": cfg.steps,
        "seed": cfg.seed,
        "batch": cfg.batch,
        "repeats": cfg.repeats,
        "pairing": cfg.pairing,
        "processes": state.num_processes,
        "threads_per_process": torch.get_num_threads(),
        "device": str(pipe.device),
        "features": cfg.features,
        "feature_extractor": None if feature_info is None else feature_info[0],
        "resize": None if feature_info is None else feature_info[1],
        "clip": cfg.clip,
        "reference_images": None if cfg.reference is None else len(cfg.reference),
        "plans": rows,
    }
    from diffroute.eval.reports import write_reports

    write_reports(result, cfg.out)
    return result


def stack_reference(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
