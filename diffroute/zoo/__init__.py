"""Model zoo: named pipelines that load offline (embedded models, tiny random models) or any diffusers path/hub id."""

from .registry import MODELS, ModelEntry, call_defaults, load_pipeline, register_model

__all__ = ["MODELS", "ModelEntry", "call_defaults", "load_pipeline", "register_model"]
