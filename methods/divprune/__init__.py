"""DivPrune: diversity-based visual token pruning (Ranjbar Alvar, Singh, Akbari, Zhang, CVPR 2025)."""

from prunelab.methods.divprune.selection import cosine_distance, max_min_diversity

__all__ = ["cosine_distance", "max_min_diversity"]
