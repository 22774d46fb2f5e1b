"""DivPrune: diversity-based visual token pruning (Ranjbar Alvar, Singh, Akbari, Zhang, CVPR 2025)."""

from prunelab.methods.divprune.method import (
    DEFAULT_KEEP_RATIO,
    LLAVA15_BUDGETS,
    DivPrune,
    divprune_keep_count,
)
from prunelab.methods.divprune.selection import cosine_distance, max_min_diversity

__all__ = ["cosine_distance", "max_min_diversity", "DivPrune", "DEFAULT_KEEP_RATIO", "LLAVA15_BUDGETS",
           "divprune_keep_count"]
