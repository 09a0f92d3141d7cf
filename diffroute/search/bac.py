"""BAC-style seed schedules: per component, the update steps chosen by dynamic programming to maximise the cosine
similarity between the output a step would reuse and its fresh output, measured on one calibration run of `full`
(see ../shared/ROUTING.md section 6). They seed the ECAD population at several compute budgets.

Deviation from BAC: similarities are measured on the calibration prompts of the search (one batch), and every
component is scheduled independently with the same number of updates.
"""

from __future__ import annotations

import torch

from diffroute.core.arch import ArchitectureMap
from diffroute.core.cache import tensors_of
from diffroute.core.schedule import Schedule


@torch.no_grad()
def similarity_tables(pipe, arch: ArchitectureMap, call, num_steps: int) -> torch.Tensor:
    """[blocks, components, steps, steps]: cosine similarity between a component's outputs at steps i <= j (mean
    over samples and CFG calls), from one `full` call made by `call()`; NaN where a component is absent."""
    outputs: dict[tuple[int, int], list[torch.Tensor]] = {}
    handles = []
    for b, row in enumerate(arch.modules):
        for c, m in enumerate(row):
            if m is None:
                continue

            def hook(module, args, out, key=(b, c)):
                first = tensors_of(out)[0]
                outputs.setdefault(key, []).append(first.detach().float().flatten(1).cpu())

            handles.append(m.register_forward_hook(hook))
    try:
        call()
    finally:
        for h in handles:
            h.remove()
    nb, nc = arch.present().shape
    table = torch.full((nb, nc, num_steps, num_steps), float("nan"))
    for (b, c), outs in outputs.items():
        x = torch.stack(outs).reshape(num_steps, len(outs) // num_steps, *outs[0].shape)  # [steps, calls, rows, D]
        x = torch.nn.functional.normalize(x, dim=-1)  # per sample
        table[b, c] = torch.einsum("icnd,jcnd->ij", x, x) / (x.shape[1] * x.shape[2])
    return table


def best_updates(sim: torch.Tensor, k: int) -> list[int]:
    """The k update steps (step 0 included) maximising sum_j sim[u(j), j], u(j) the last update at or before j."""
    s = sim.shape[0]
    k = max(1, min(k, s))
    # gain[i][j]: total similarity of steps i..j-1 when step i is an update that serves them
    gain = torch.zeros(s + 1, s + 1, dtype=torch.float64)
    for i in range(s):
        gain[i, i + 1 :] = torch.cumsum(sim[i, i:].double(), 0)
    neg = float("-inf")
    best = torch.full((k + 1, s + 1), neg, dtype=torch.float64)  # best[m][j]: m updates covering steps < j
    arg = torch.zeros((k + 1, s + 1), dtype=torch.long)
    best[0, 0] = 0.0
    for m in range(1, k + 1):
        for j in range(1, s + 1):
            # the m-th update at step i < j serves steps i..j-1
            cand = best[m - 1, :j] + gain[:j, j]
            i = int(torch.argmax(cand))
            best[m, j], arg[m, j] = cand[i], i
    steps, j = [], s
    for m in range(k, 0, -1):
        i = int(arg[m, j])
        steps.append(i)
        j = i
    return sorted(steps)


def bac_schedules(arch: ArchitectureMap, table: torch.Tensor, fractions=(0.3, 0.4, 0.5, 0.6, 0.7)) -> list[Schedule]:
    """One schedule per computed fraction: each component updates at its own DP-chosen steps."""
    num_steps = table.shape[-1]
    out = []
    for f in fractions:
        k = max(1, round(f * num_steps))
        s = Schedule.full(arch, num_steps)
        s.provenance.update(rule="bac", fraction=f)
        for b, row in enumerate(arch.modules):
            for c, m in enumerate(row):
                if m is None:
                    continue
                col = torch.zeros(num_steps, dtype=torch.bool)
                col[best_updates(table[b, c].nan_to_num(0.0), k)] = True
                s.compute[:, b, c] = col
        out.append(s)
    return out
