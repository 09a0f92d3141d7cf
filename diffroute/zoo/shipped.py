"""Shipped plans by name: `MODEL:NAME` is the schedule `zoo/weights/MODEL/schedules/NAME.json` (e.g. `emoji:fast`)
or the trained router `zoo/weights/MODEL/routers/NAME/` (e.g. `emoji:l2c`)."""

from __future__ import annotations

import re
from pathlib import Path

from diffroute.core.schedule import Schedule
from diffroute.plans.base import PLAN_EXAMPLES, Plan, plan_examples, register_plan, schedule_plan
from diffroute.utils.io import readable_by_others

WEIGHTS = Path(__file__).parent / "weights"


def shipped_schedules() -> dict[str, Path]:
    return {f"{p.parent.parent.name}:{p.stem}": p for p in sorted(WEIGHTS.glob("*/schedules/*.json"))}


def shipped_routers() -> dict[str, Path]:
    return {
        f"{p.parent.parent.parent.name}:{p.parent.name}": p.parent
        for p in sorted(WEIGHTS.glob("*/routers/*/config.json"))
    }


SHIP_NAME = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")  # what `MODEL:NAME` and a zoo folder name round-trip


def check_ship(kind: str, model: str, name: str, replace: bool = False, method: str | None = None) -> str:
    """Refuse, before any work, to install `name` into the zoo when it would not round-trip or would replace what
    this kind of run did not create. `kind`: "schedule" or "router" (installed as `MODEL:NAME`), or "variant" (the
    zoo model `name`, made by `diffroute train METHOD`). The same kind of artifact is replaced only with `replace`;
    another kind (a router named like a shipped schedule, a MoE named like the emoji-CLIP scorer or like the Elastic
    variant whose routers need its backbone) never."""
    from diffroute.errors import InputError

    if not isinstance(name, str) or not SHIP_NAME.fullmatch(name) or len(name) > 64:
        raise InputError(
            f"--ship {name!r}: give a name of lowercase ASCII letters and digits, words joined by single '-' (e.g. "
            "fast, l2c, emoji-moe), at most 64 characters."
        )
    if kind == "variant":
        from diffroute.zoo.registry import MODELS

        folder = WEIGHTS / name
        spec = folder / "variant.json"
        made_by = _read_json(spec).get("shipped_by") if spec.is_file() else None
        if folder.exists() or name in MODELS:
            if made_by is None or made_by != method:
                raise InputError(
                    f"--ship {name}: {name!r} is a shipped model that `diffroute train {method}` did not create; "
                    "it is never replaced. Choose another name."
                )
            if not replace:
                raise InputError(f"--ship {name}: the zoo model {name!r} exists; pass --replace to replace it.")
        return name
    full = f"{model}:{name}"
    mine, other = (
        (shipped_schedules(), shipped_routers()) if kind == "schedule" else (shipped_routers(), shipped_schedules())
    )
    if full in other:
        raise InputError(
            f"--ship {name}: {full} is a shipped {'router' if kind == 'schedule' else 'schedule'}; a "
            f"{kind} of that name would shadow it. Choose another name."
        )
    if full in mine and not replace:
        raise InputError(f"--ship {name}: the shipped {kind} {full} exists; pass --replace to replace it.")
    return name


def _read_json(path: Path) -> dict:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def install_schedule(source: Path, model: str, name: str) -> Path:
    """Copy a schedule JSON into the zoo as `MODEL:NAME` (atomically), recording the name in its provenance."""
    schedule = Schedule.load(source)  # validated before anything is written into the zoo
    schedule.provenance["shipped_as"] = f"{model}:{name}"
    dest = WEIGHTS / model / "schedules" / f"{name}.json"
    schedule.save(dest)
    return dest


def install_router(folder: Path, model: str, name: str) -> str:
    """Copy a trained router folder into the zoo as `MODEL:NAME` (written beside, then renamed into place)."""
    import shutil

    from diffroute.routers import load_router
    from diffroute.utils.checked_load import require_finite

    require_finite(load_router(folder).state_dict(), f"router {folder}")  # validated before anything is written
    dest = WEIGHTS / model / "routers" / name
    tmp = dest.with_name(f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folder, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return f"{model}:{name}"


def install_model_variant(pipeline_folder: Path, name: str, base: str = "emoji", method: str | None = None) -> str:
    """Install the fine-tuned transformer of a `base` zoo pipeline (an upcycled MoE or a plain fine-tune) as the zoo
    model `name`, fp16 on disk like the base; the other components are the base's. Written beside, then renamed."""
    import json
    import shutil

    import torch

    from diffroute.zoo.registry import load_transformer

    source = Path(pipeline_folder) / "transformer"
    from diffroute.utils.checked_load import require_finite

    transformer = load_transformer(source, dtype=torch.float16)  # validated before anything is written
    require_finite(transformer.state_dict(), f"model {pipeline_folder}")
    dest = WEIGHTS / name
    tmp = dest.with_name(f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    transformer.save_pretrained(tmp / "transformer")
    config = tmp / "transformer" / "config.json"
    kept = {k: v for k, v in json.loads(config.read_text()).items() if k != "_name_or_path"}
    config.write_text(json.dumps(kept, indent=2, sort_keys=True) + "\n")
    # `shipped_by`: the training that made it, the only one that may replace it (check_ship)
    readable_by_others(tmp)  # diffusers writes its weights private (0600)
    (tmp / "variant.json").write_text(json.dumps({"base": base, "shipped_by": method}, indent=2) + "\n")
    if (dest / "routers").is_dir():  # routers trained on this variant stay with it
        shutil.copytree(dest / "routers", tmp / "routers")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return name


def ship_front(result: dict, ship: dict[str, float], settings) -> dict[str, str]:
    """Install, per NAME=MAXCOST, the best front member of a search (`search.run.run_search`'s result, its
    `SearchSettings`) within that cost as the zoo schedule MODEL:NAME."""
    from diffroute.errors import InputError
    from diffroute.search.run import pick_from

    shipped = {}
    for name, max_cost in ship.items():
        file = pick_from(result, max_cost, settings)
        if file is None:
            raise InputError(f"ship {name}={max_cost}: no front member costs <= {max_cost}; raise the budget.")
        shipped[f"{settings.model}:{name}"] = str(install_schedule(Path(file), settings.model, name))
    return shipped


def zoo_seeds(model: str, arch, steps: int) -> list:
    """The schedules the zoo holds for `model` at this step count and model class, to seed a search: its shipped
    L2C routers (a router is a static schedule; per-sample routers such as Elastic are none) and its shipped
    schedules (an earlier search's front members, so that a new search starts from where the last one ended; not
    their fitted versions, whose cells are their bases')."""
    from diffroute.core.schedule import Schedule
    from diffroute.routers import load_router

    seeds = []
    for name, folder in shipped_routers().items():
        if name.split(":")[0] != model:
            continue
        router = load_router(folder)
        if not hasattr(router, "schedule"):  # a per-sample router (Elastic) is no static schedule
            continue
        if router.config.num_steps == steps and router.config.model_class == arch.model_class:
            seeds.append(router.schedule())
    for name, path in shipped_schedules().items():
        if name.split(":")[0] == model:
            schedule = Schedule.load(path)
            fitted = schedule.fit is not None  # (its cells are its base schedule's, which is a seed already)
            if schedule.num_steps == steps and schedule.model_class == arch.model_class and not fitted:
                seeds.append(schedule)
    return seeds


def _shipped(m: re.Match) -> Plan:
    name = m.group(0)
    routers = shipped_routers()
    if name in routers:
        from diffroute.routers import router_plan  # the routing package imports plans: import it late

        return router_plan(routers[name], name)
    found = shipped_schedules()
    if name not in found:
        shipped = ", ".join([*found, *routers]) or "none"
        raise ValueError(f"No shipped schedule or router {name!r}; shipped: {shipped}.")
    return schedule_plan(Schedule.load(found[name]), name=name)


register_plan(
    r"[a-z0-9-]+:[a-z0-9_-]+", _shipped, "MODEL:NAME", "a shipped schedule or router, e.g. emoji:fast, emoji:l2c"
)
PLAN_EXAMPLES.extend(n for n in [*shipped_schedules(), *shipped_routers()] if n not in PLAN_EXAMPLES)


def plans_for(model: str) -> list[str]:
    """The example plans that fit `model`: the generic ones, and the shipped `MODEL:NAME` ones of this model only (a
    router or schedule of `emoji-elastic` belongs to that variant's fine-tuned weights, not to `emoji`)."""
    shipped = {*shipped_schedules(), *shipped_routers()}
    return [p for p in plan_examples() if p not in shipped or p.split(":", 1)[0] == model]
