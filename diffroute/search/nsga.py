"""NSGA-II (pymoo) over schedule genomes, generation by generation, with a checkpoint after each generation.

Every evaluated genome is kept in `evals/<key>.json` (written atomically by the process that evaluated it), so a
run killed mid-generation loses nothing finished and a resumed run re-evaluates nothing. Each generation rebuilds
NSGA-II from the saved population with a seed derived from (seed, generation): a resumed run reaches the same
result as an uninterrupted one. No pickle: the checkpoint is JSON.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.evaluator import Evaluator
from pymoo.core.population import Population
from pymoo.core.problem import Problem
from pymoo.operators.crossover.pntx import TwoPointCrossover
from pymoo.operators.mutation.bitflip import BitflipMutation
from pymoo.problems.static import StaticProblem
from tqdm.auto import tqdm

from diffroute.io import atomic_write_json, read_json

from .genome import GenomeSpace


@dataclass
class SearchConfig:
    pop_size: int = 24
    generations: int = 10
    seed: int = 0
    quality: str = "fd"  # objective 2: "fd" (vs full, lower), "psnr" (vs full, higher), "clip" (higher), "user"
    cost: str = "cost"  # objective 1: "cost" (analytic FLOPs) or "latency" (measured transformer time)
    mutation_prob: float = 0.02  # per-bit flip probability


def quality_value(record: dict, quality: str) -> float:
    """The quality objective to minimise."""
    return -record[quality] if quality in ("psnr", "clip") else record[quality]


def _bits_to_str(bits) -> str:
    return "".join("1" if b else "0" for b in bits)


def _str_to_bits(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), dtype=np.uint8) == ord("1")


class Search:
    """Runs NSGA-II; `evaluate(schedule) -> dict` scores a candidate; `state` is an accelerate PartialState."""

    def __init__(self, space: GenomeSpace, evaluate, cfg: SearchConfig, out: Path, state):
        self.space, self.evaluate, self.cfg, self.out, self.state = space, evaluate, cfg, Path(out), state
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
            mutation=BitflipMutation(prob=1.0, prob_var=self.cfg.mutation_prob),
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
        if ckpt_path.is_file():
            ckpt = read_json(ckpt_path, "search checkpoint")
            gen, X = ckpt["generation"], np.stack([_str_to_bits(s) for s in ckpt["population"]])
        else:
            gen, X = 0, self.space.seeds(np.random.default_rng(self.cfg.seed), self.cfg.pop_size)
        bar = tqdm(
            total=self.cfg.generations,
            initial=gen,
            desc="generations",
            file=sys.stderr,
            disable=not self.state.is_main_process,
        )
        while gen < self.cfg.generations:
            alg = self._algorithm(X, gen)
            self._tell(alg, alg.ask())  # the current population (scores come from the archive)
            self._tell(alg, alg.ask())  # offspring: crossover + mutation, then survival
            X, gen = alg.pop.get("X").astype(bool), gen + 1
            if self.state.is_main_process:
                atomic_write_json(ckpt_path, {"generation": gen, "population": [_bits_to_str(x) for x in X]})
            self.state.wait_for_everyone()
            bar.update(1)
        bar.close()
        return {"generation": gen, "population": X, "records": self.scores(X)}

    def archive(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.evals_dir.glob("*.json"))]
