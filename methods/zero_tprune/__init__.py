"""Zero-TPrune: zero-shot token pruning through the attention graph (Wang, Dedhia, Jha, CVPR 2024)."""

from prunelab.methods.zero_tprune.method import ZeroTPrune, resolve_schedule
from prunelab.methods.zero_tprune.wpr import (
    aggregate_heads,
    emphasize_informative_region,
    initial_distribution,
    restrict_attention,
    sequential_u_partition,
    similarity_prune,
    variance_head_filter,
    wpr_scores,
)

__all__ = [
    "ZeroTPrune", "resolve_schedule", "wpr_scores", "initial_distribution",
    "variance_head_filter", "emphasize_informative_region", "aggregate_heads", "restrict_attention",
    "sequential_u_partition", "similarity_prune",
]
