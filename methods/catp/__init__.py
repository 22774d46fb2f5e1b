"""CATP: contextually adaptive token pruning for multimodal in-context learning (AAAI 2026, arXiv 2508.07871)."""

from prunelab.methods.catp.demos import DemonstrationSet
from prunelab.methods.catp.method import CATP, LAYERS, PAPER_RATIOS, context_total, query_count, stage1_count
from prunelab.methods.catp.selection import context_scores, facility_location, query_scores, rescaled_cosine

__all__ = ["CATP", "LAYERS", "PAPER_RATIOS", "DemonstrationSet", "context_scores", "context_total", "facility_location",
           "query_count", "query_scores", "rescaled_cosine", "stage1_count"]
