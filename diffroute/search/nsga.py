"""NSGA-II (pymoo) over schedule genomes, generation by generation, with a checkpoint after each generation.

After each generation the hypervolume of the archive's front is recorded (pymoo's HV, in normalised objectives
against a fixed reference point); the search stops early when it has not grown by `plateau_tol` (relative) for
`patience` generations.

Every evaluated genome is kept in `evals/<key>.json` (written atomically by the process that evaluated it), so a
run killed mid-generation loses nothing finished and a resumed run re-evaluates nothing. Each generation rebuilds
NSGA-II from the saved population with a seed derived from (seed, generation): a resumed run reaches the same
result as an uninterrupted one. No pickle: the checkpoint is JSON.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.evaluator import Evaluator
from pymoo.core.population import Population
from pymoo.core.problem import Problem
from pymoo.indicators.hv import HV
from pymoo.operators.crossover.pntx import TwoPointCrossover
from pymoo.problems.static import StaticProblem
from tqdm.auto import tqdm

from diffroute.search.genome import GenomeSpace, StructuredMutation
from diffroute.utils.io import atomic_write_json, read_json


@dataclass
class SearchConfig:
    pop_size: int = 24
    generations: int = 10
    seed: int = 0
    # objective 2: "fd" (vs full, lower), "psnr" (pooled, vs full, higher), "psnr_mean" (mean per-image PSNR capped
    # at 60 dB, higher), "clip" (higher), "user"
    quality: str = "fd"
    # objective 1: "cost" (analytic FLOPs), "latency_model" (predicted by a measured latency table) or "latency"
    # (measured transformer time, noisy)
    cost: str = "cost"
    mutation_prob: float = 0.02  # per-bit flip probability
    structured: float = 0.5  # probability of one structural move per offspring (see StructuredMutation)
    patience: int = 3  # generations without hypervolume growth before stopping early (0: never)
    plateau_tol: float = 0.002  # relative hypervolume growth that counts as growth
    budget_minutes: float = 0.0  # stop at the first generation boundary past this much search time (0: no budget)


HIGHER_IS_BETTER = ("psnr", "psnr_mean", "clip")


def quality_value(record: dict, quality: str) -> float:
    """The quality objective to minimise."""
    return -record[quality] if quality in HIGHER_IS_BETTER else record[quality]


def hypervolume(F: np.ndarray, quality: str, ref_quality: float) -> float:
    """Hypervolume of the points F = [cost, quality objective] against (cost 1.1, ref_quality), both axes scaled to
    a fixed box (cost from 0; quality from -60 dB for PSNR-like objectives, from 0 for FD and other non-negative
    ones) so that the value is comparable across generations (0 = nothing dominates the reference)."""
    lo = np.array([0.0, -60.0 if quality in HIGHER_IS_BETTER else 0.0])
    ref = np.array([1.1, ref_quality])
    scale = np.where(ref - lo > 0, ref - lo, 1.0)
    inside = (F < ref).all(axis=1)
    if not inside.any():
        return 0.0
    return float(HV(ref_point=np.ones(2))((F[inside] - lo) / scale))


def _bits_to_str(bits) -> str:
    return "".join("1" if b else "0" for b in bits)


def _str_to_bits(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), dtype=np.uint8) == ord("1")


class Search:
    """Runs NSGA-II; `evaluate(schedule) -> dict` scores a candidate; `state` is an accelerate PartialState."""

    def __init__(self, space: GenomeSpace, evaluate, cfg: SearchConfig, out: Path, state, seeds=()):
        self.space, self.evaluate, self.cfg, self.out, self.state = space, evaluate, cfg, Path(out), state
        self.extra_seeds = list(seeds)  # schedules to seed the population with (BAC, L2C)
        self.evals_dir = self.out / "evals"
        self.problem = Problem(n_var=space.n_var, n_obj=2, xl=0, xu=1, vtype=bool)

    # ---- evaluations (parallel, memoised on disk) ---------------------------------------------------------------
    def _record(self, bits) -> dict | None:
        path = self.evals_dir / f"{GenomeSpace.key(bits)}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def scores(self, X: np.ndarray) -> list[dict]:
        """Scores of all genomes in X: each process evaluates its share of the missing ones, then all read them."""
        missing = [x for x in {GenomeSpace.key(x): x for x in X}.values() if self._record(x) is None]
        with self.state.split_between_processes(missing) as mine:
            bar = tqdm(mine, desc="evaluate", file=sys.stderr, leave=False, disable=not self.state.is_main_process)
            for bits in bar:
                rec = self.evaluate(self.space.to_schedule(bits))
                rec["genome"] = _bits_to_str(bits)
                atomic_write_json(self.evals_dir / f"{GenomeSpace.key(bits)}.json", rec)
        self.state.wait_for_everyone()
        return [self._record(x) for x in X]

    def objectives(self, records: list[dict]) -> np.ndarray:
        q = [quality_value(r, self.cfg.quality) for r in records]
        return np.column_stack([[r[self.cfg.cost] for r in records], q]).astype(float)

    # ---- the generations --------------------------------------------------------------------------------------
    def _algorithm(self, X: np.ndarray, gen: int) -> NSGA2:
        alg = NSGA2(
            pop_size=self.cfg.pop_size,
            sampling=Population.new("X", X),
            crossover=TwoPointCrossover(),
            mutation=StructuredMutation(self.space, self.cfg.mutation_prob, self.cfg.structured),
            eliminate_duplicates=True,
        )
        alg.setup(self.problem, seed=self.cfg.seed * 1000 + gen, verbose=False)
        return alg

    def _tell(self, alg, pop) -> None:
        F = self.objectives(self.scores(pop.get("X")))
        Evaluator().eval(StaticProblem(self.problem, F=F), pop)
        alg.tell(infills=pop)

    def run(self) -> dict:
        ckpt_path = self.out / "checkpoint.json"
        history: list[float] = []
        ref = None
        spent = 0.0  # seconds of search time before this process (kept in the checkpoint across resumes)
        if ckpt_path.is_file():
            ckpt = read_json(ckpt_path, "search checkpoint")
            gen, X = ckpt["generation"], np.stack([_str_to_bits(s) for s in ckpt["population"]])
            history, ref = ckpt.get("hypervolume", []), ckpt.get("reference_quality")
            spent = float(ckpt.get("seconds", 0.0))
        else:
            gen = 0
            X = self.space.seeds(np.random.default_rng(self.cfg.seed), self.cfg.pop_size, self.extra_seeds)
        bar = tqdm(
            total=self.cfg.generations,
            initial=gen,
            desc="generations",
            file=sys.stderr,
            disable=not self.state.is_main_process,
        )
        started = time.perf_counter()
        while gen < self.cfg.generations and not self.plateaued(history) and not self.over_budget(spent):
            alg = self._algorithm(X, gen)
            self._tell(alg, alg.ask())  # the current population (scores come from the archive)
            if ref is None:  # fixed once, from the first population: the worst quality it has, with a margin
                q = self.objectives(self.scores(X))[:, 1]
                ref = float(q.max() + 0.1 * (abs(q.max()) + 1e-9))
            self._tell(alg, alg.ask())  # offspring: crossover + mutation, then survival
            X, gen = alg.pop.get("X").astype(bool), gen + 1
            spent, started = spent + time.perf_counter() - started, time.perf_counter()
            history.append(hypervolume(self.objectives(self.archive()), self.cfg.quality, ref))
            if self.state.is_main_process:
                atomic_write_json(
                    ckpt_path,
                    {
                        "generation": gen,
                        "population": [_bits_to_str(x) for x in X],
                        "hypervolume": history,
                        "reference_quality": ref,
                        "seconds": spent,
                    },
                )
            self.state.wait_for_everyone()
            bar.update(1)
            bar.set_postfix(hv=f"{history[-1]:.4f}")
        bar.close()
        return {
            "generation": gen,
            "population": X,
            "records": self.scores(X),
            "hypervolume": history,
            "seconds": spent,
            "stopped_by": self.stop_reason(gen, history, spent),
        }

    def over_budget(self, spent: float) -> bool:
        return self.cfg.budget_minutes > 0 and spent >= 60 * self.cfg.budget_minutes

    def stop_reason(self, gen: int, history: list[float], spent: float) -> str:
        if self.plateaued(history):
            return "plateau"
        if self.over_budget(spent):
            return "budget"
        return "generations"

    def plateaued(self, history: list[float]) -> bool:
        """No relative hypervolume growth above plateau_tol over the last `patience` generations."""
        p = self.cfg.patience
        if p <= 0 or len(history) <= p:
            return False
        base = history[-p - 1]
        return history[-1] <= base * (1 + self.cfg.plateau_tol)

    def archive(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.evals_dir.glob("*.json"))]
