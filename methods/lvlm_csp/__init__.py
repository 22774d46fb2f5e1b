"""LVLM_CSP: clustering, scattering and pruning of image tokens for reasoning segmentation (arXiv 2504.10854)."""

from prunelab.methods.lvlm_csp.baseline import SegPrune
from prunelab.methods.lvlm_csp.method import LVLMCSP, SELECTORS, mean_image_tokens
from prunelab.methods.lvlm_csp.selection import (
    SCATTER_MODES,
    assign,
    cls_attention,
    random_tokens,
    scatter,
    seg_first,
    seg_scores,
    uniform,
)

__all__ = ["LVLMCSP", "SCATTER_MODES", "SELECTORS", "SegPrune", "assign", "cls_attention", "mean_image_tokens",
           "random_tokens", "scatter", "seg_first", "seg_scores", "uniform"]
