"""How a pipeline runs: device, dtype, threads, attention back-end and torch.compile (`options`), set once for the CLI
and the app."""

from diffroute.runtime.options import DTYPES, Runtime, load_with, set_threads

__all__ = ["DTYPES", "Runtime", "load_with", "set_threads"]
