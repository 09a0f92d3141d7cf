"""Dynamic caching policies, each a decider on the one executor: first-block residual (FBCache/DBCache),
TeaCache-style accumulated distance, and Taylor forecasting. Importing this package registers their plan names."""

from diffroute.policies import checked, first_block, taylor, teacache  # noqa: F401  (registers plan names)
