"""Trained routers by class: load a saved router folder and make the plan that runs it."""

from __future__ import annotations

import json
from pathlib import Path

from diffroute.errors import InputError, PlanError
from diffroute.utils.checked_load import check_against_weights, check_config_values


def _classes() -> dict:
    from diffroute.routers.elastic import ElasticPlan, ElasticRouter
    from diffroute.routers.gates import GatePlan, GateRouter
    from diffroute.routers.l2c import L2CRouter, RouterPlan

    # config `_class_name` -> (router class, plan class)
    return {
        "L2CRouter": (L2CRouter, RouterPlan),
        "ElasticRouter": (ElasticRouter, ElasticPlan),
        "GateRouter": (GateRouter, GatePlan),
    }


def load_router(folder):
    """A saved router folder (config.json + safetensors), refused with a clear message when it is not one."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise PlanError(f"{str(folder)!r} is not a router folder (no config.json); train one with `diffroute train`.")
    try:
        settings = json.loads(config.read_text())
        router_class = _classes()[settings.get("_class_name")][0]
        weights = sorted(folder.glob("*.safetensors"))
        if len(weights) != 1:
            raise PlanError(f"router folder {str(folder)!r} should hold one .safetensors file; found {len(weights)}.")
        # an untrusted folder: its config is checked against its weights before anything is allocated
        check_config_values(settings, f"router folder {str(folder)!r}")
        check_against_weights(lambda: router_class.from_config(settings), weights[0], f"router folder {str(folder)!r}")
        return router_class.from_pretrained(folder)
    except InputError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        known = ", ".join(_classes())
        raise PlanError(
            f"router folder {str(folder)!r} cannot be loaded ({e!r}; known: {known}); train it again."
        ) from e


def router_plan(folder, name: str):
    """The plan running the router saved in `folder`."""
    router = load_router(folder)
    return _classes()[type(router).__name__][1](router, name=name)
