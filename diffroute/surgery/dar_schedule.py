"""Skip schedules read from DAR's aggregation weights: reuse the blocks whose outputs the later blocks read least.

DAR's weights say, per timestep, how much of each block's output (`v_l`) the blocks after it read. A block that gets
little weight is a candidate for skipping: its cached output (the executor's reuse) stands in for it, and the later
blocks lean on it less than on the others. `dar_skip_schedule` turns the per-step received weights (from
`eval.stream_report.dar_weights`, `received_by_step`) into an executor `Schedule`: after a warm-up, every `every`-th
step reuses all components of the `skip` blocks that receive the least weight at that step's timestep. Its control,
`pick="highest"`, reuses the same number of blocks chosen by the most weight, so the two compute exactly as much.
"""

from __future__ import annotations

import torch

from diffroute.core.arch import ArchitectureMap
from diffroute.core.schedule import Schedule, ScheduleMismatchError

PICKS = ("lowest", "highest")


def dar_skip_schedule(
    arch: ArchitectureMap,
    received_by_step: torch.Tensor,
    skip: int,
    every: int = 2,
    warmup: int = 2,
    pick: str = "lowest",
) -> Schedule:
    """`received_by_step`: [steps, 1 + blocks] relative weights (source 0 is the patch embedding, source l + 1 is
    block l's output; 1 is the plain residual sum's share). Steps before `warmup` compute everything; after it,
    the steps `warmup + every - 1, warmup + 2 * every - 1, ...` reuse the `skip` blocks picked at that step."""
    received = torch.as_tensor(received_by_step, dtype=torch.float64)
    if pick not in PICKS:
        raise ValueError(f"pick must be one of {PICKS}, got {pick!r}.")
    if received.ndim != 2 or received.shape[1] != arch.num_blocks + 1:
        raise ScheduleMismatchError(
            f"the DAR weights cover {received.shape[-1] - 1} blocks, {arch.model_class} has {arch.num_blocks}: "
            "record them on this model (`diffroute eval streams ... --dar RUN`)."
        )
    if not 1 <= skip < arch.num_blocks:
        raise ValueError(f"skip must be 1 to {arch.num_blocks - 1} blocks, got {skip}.")
    if every < 2 or not 0 <= warmup < received.shape[0]:
        raise ValueError(f"every must be >= 2 and warmup 0 to {received.shape[0] - 1}; got {every}, {warmup}.")
    steps = received.shape[0]
    provenance = {"rule": f"dar-{pick}-{skip}", "skip": skip, "every": every, "warmup": warmup, "picked": {}}
    sched = Schedule.full(arch, steps)
    sched.provenance = provenance
    for s in range(max(warmup, 1), steps):
        if (s - warmup) % every != every - 1:
            continue
        blocks = torch.argsort(received[s, 1:], descending=pick == "highest", stable=True)[:skip]
        sched.compute[s, blocks] = False
        provenance["picked"][str(s)] = sorted(blocks.tolist())
    return sched
