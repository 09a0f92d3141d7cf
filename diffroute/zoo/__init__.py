"""Model zoo: named pipelines that load offline (embedded models, tiny random models) or any diffusers path/hub id."""

from diffroute.zoo.registry import DEFAULT_MODEL, MODELS, ModelEntry, call_defaults, load_pipeline, register_model

__all__ = ["DEFAULT_MODEL", "MODELS", "ModelEntry", "call_defaults", "load_pipeline", "register_model"]
