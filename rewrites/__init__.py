"""The rule library: one file per rule, and the one ordered list the pipeline runs."""

from rewrites import linear_to_conv1x1, rmsnorm_to_layernorm

# Order matters: norms first (their patterns read the graph as exported), then projections.
RULES = [
    rmsnorm_to_layernorm.RULE,
    linear_to_conv1x1.RULE,
]

__all__ = ["RULES"]
