"""diffroute: timestep-aware routing (feature caching by compute plans) for diffusers DiT pipelines.

The public names below load on first use (PEP 562), so that `diffroute --help` and argument errors answer without
importing torch and diffusers.
"""

import importlib

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "apply": "api",
    "get_executor": "api",
    "last_stats": "api",
    "remove": "api",
    "set_attention": "runtime.attention",
    "compile_transformer": "runtime.compiling",
    "Runtime": "runtime",
    "load_with": "runtime",
    "ARCHITECTURES": "core.arch",
    "ArchSpec": "core.arch",
    "ArchitectureMap": "core.arch",
    "UnsupportedModelError": "core.arch",
    "architecture_map": "core.arch",
    "register_architecture": "core.arch",
    "Plan": "plans",
    "RulePlan": "plans",
    "SchedulePlan": "plans",
    "schedule_plan": "plans",
    "register_plan": "plans",
    "resolve_plan": "plans",
    "Schedule": "core.schedule",
    "ScheduleMismatchError": "core.schedule",
    "CallStats": "core.stats",
    "load_pipeline": "zoo",
    "MODELS": "zoo",
    "ExpertEnsemble": "experts.ensemble",
    "ExpertRouter": "experts.router",
    "InputError": "errors",
    "PlanError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'diffroute' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
