"""VisionDrop: visual-only progressive token dropping in the vision encoder and the LLM (arXiv 2506.22283)."""

from prunelab.methods.visiondrop.method import LLM_LAYERS, PAPER_BUDGETS, VisionDrop
from prunelab.methods.visiondrop.schedule import (
    OFFICIAL_BUDGET,
    OFFICIAL_SCHEDULE,
    budget_schedule,
    share_schedule,
    stage_counts,
)
from prunelab.methods.visiondrop.selection import (
    assign_members,
    cls_scores,
    contextual_targets,
    dominant_tokens,
    head_mean_keys,
    mean_query_scores,
    visiondrop_reduction,
)

__all__ = [
    "VisionDrop", "LLM_LAYERS", "PAPER_BUDGETS", "OFFICIAL_BUDGET", "OFFICIAL_SCHEDULE", "budget_schedule",
    "share_schedule", "stage_counts",
    "assign_members", "cls_scores", "contextual_targets", "dominant_tokens", "head_mean_keys",
    "mean_query_scores", "visiondrop_reduction",
]
