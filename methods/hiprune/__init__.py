"""HiPrune: training-free visual token pruning via hierarchical attention (Liu et al., arXiv 2508.00553)."""

from prunelab.methods.hiprune.method import ENCODER_BLOCKS, PAPER_BUDGETS, HiPrune
from prunelab.methods.hiprune.selection import (
    DEFAULT_ANCHOR_RATIO,
    HiPrunePartition,
    Role,
    anchor_count,
    anchor_tokens,
    best_in_mask,
    buffer_tokens,
    hiprune_partition,
    hiprune_select,
    merge_unit_scores,
    received_attention,
    register_tokens,
)

__all__ = [
    "HiPrune", "ENCODER_BLOCKS", "PAPER_BUDGETS", "DEFAULT_ANCHOR_RATIO", "HiPrunePartition", "Role",
    "received_attention", "merge_unit_scores", "anchor_count", "anchor_tokens", "buffer_tokens",
    "best_in_mask", "register_tokens", "hiprune_partition", "hiprune_select",
]
