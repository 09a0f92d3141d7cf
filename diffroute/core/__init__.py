"""The seam every method plugs into: the executor (hooks and the call lifecycle), decisions, the feature cache, the
step and call contexts, per-call stats, block streams and FFN widths, architecture specs and schedules.

Nothing here imports plans, policies, routers, surgery or training: they build on it (tests/test_layers.py)."""
