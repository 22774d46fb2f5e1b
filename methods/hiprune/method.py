"""HiPrune (Liu et al., arXiv 2508.00553): training-free visual token pruning from hierarchical attention.

The method object holds the paper's hyperparameters. It knows no model yet: the VLM seam (reading
the two encoder blocks' attention and gathering the kept image features) is added by a later change.
Official code: ``Danielement321/HiPrune`` (MIT), compared at commit 6e83a12; see README.md for what differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType

import torch

from prunelab.common.tokens import keep_count
from prunelab.methods.hiprune.selection import (
    DEFAULT_ANCHOR_RATIO,
    HiPrunePartition,
    hiprune_partition,
)

ENCODER_BLOCKS = MappingProxyType({
    # 0-based block indices (object layer, deep layer); negative counts from the end. Card §3.
    "clip": (8, -2),  # LLaVA-1.5 / LLaVA-NeXT: layer 9 (1-based); the penultimate layer = LLaVA's feature layer
    "qwen2_5_vl": (15, -1),  # Qwen2.5-VL: layer 16 (1-based, a full-attention block); the last block
})
"""Default (object_block, deep_block) per vision-encoder family."""

PAPER_BUDGETS = MappingProxyType({
    "llava-1.5": (192, 128, 64),  # of 576 (card §3, HIPRUNE_RETENTION)
    "llava-next": (640, 320, 160),  # of 2880, split over the crops (card §3)
    "qwen2_5_vl": (0.334, 0.223, 0.112),  # keep ratios (card §3, HIPRUNE_QWEN_RETENTION)
})
"""The budgets the paper evaluates, per model."""


@dataclass(frozen=True)
class HiPrune:
    """HiPrune's hyperparameters; defaults are the paper's LLaVA-1.5 setting (card §3).

    Attributes:
        budget: N', image tokens kept per image. An int is a count (card §3: 192 / 128 / 64 of 576 on
            LLaVA-1.5); a float in (0, 1] is a keep ratio of the image's tokens (card §3: Qwen2.5-VL
            0.334 / 0.223 / 0.112), converted by ``keep_count`` (round half up) or, with
            ``official_quirks``, by Python's ``round`` like the official Qwen code (card §2).
        anchor_ratio: alpha, the budget share of anchors and their buffers; anchors = round(N' * alpha / 5)
            (card §2.3; 0.1 for every model, card §3). 0 gives the registers-only ablation.
        encoder: vision-encoder family, which picks the default blocks: ``"clip"`` (LLaVA-1.5, LLaVA-NeXT)
            or ``"qwen2_5_vl"`` (card §3).
        object_block: 0-based encoder block whose attention picks anchors ("object-centric middle
            layer"); None = the family default: CLIP 8 (the paper's layer 9), Qwen2.5-VL 15 (layer 16).
        deep_block: 0-based block whose attention picks registers; negatives count from the end. None =
            the family default: CLIP -2 (LLaVA's feature layer), Qwen2.5-VL -1 (the last block).
        official_quirks: reproduce the official code's anchor and budget rounding and its flat-index
            neighbours (wrap across rows, clamp at the top and bottom; card §5.1). README.md lists each.
    """

    budget: int | float = 192
    anchor_ratio: float = DEFAULT_ANCHOR_RATIO
    encoder: str = "clip"
    object_block: int | None = None
    deep_block: int | None = None
    official_quirks: bool = False

    def __post_init__(self):
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise ValueError(f"budget must be a token count (int >= 1) or a keep ratio (float in (0, 1]), got {b!r}")
        if isinstance(b, int) and b < 1:
            raise ValueError(f"budget must be >= 1 tokens, got {b}")
        if isinstance(b, float) and (math.isnan(b) or not 0.0 < b <= 1.0):
            raise ValueError(f"budget as a keep ratio must be in (0, 1], got {b}")
        a = self.anchor_ratio
        if isinstance(a, bool) or not isinstance(a, (int, float)) or math.isnan(a) or not 0 <= a <= 1:
            raise ValueError(f"anchor_ratio must be in [0, 1], got {a!r}")
        if self.encoder not in ENCODER_BLOCKS:
            raise ValueError(f"encoder must be one of {sorted(ENCODER_BLOCKS)}, got {self.encoder!r}")
        for name in ("object_block", "deep_block"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"{name} must be an int block index or None, got {v!r}")
        if not isinstance(self.official_quirks, bool):
            raise ValueError(f"official_quirks must be a bool, got {self.official_quirks!r}")

    @property
    def blocks(self) -> tuple[int, int]:
        """(object_block, deep_block), 0-based, with the encoder family's defaults filled in."""
        obj, deep = ENCODER_BLOCKS[self.encoder]
        return (obj if self.object_block is None else self.object_block,
                deep if self.deep_block is None else self.deep_block)

    def budget_for(self, n: int) -> int:
        """N' for an image of ``n`` tokens; a count above ``n`` raises."""
        if isinstance(self.budget, int):
            if self.budget > n:
                raise ValueError(f"budget {self.budget} exceeds the {n} tokens of the image")
            return self.budget
        if self.official_quirks:
            k = round(n * self.budget)  # Qwen code: round(n_image_tokens * RETAIN), half to even
            if not 1 <= k <= n:
                raise ValueError(f"budget ratio {self.budget} of {n} tokens rounds to {k} (official rounding)")
            return k
        return keep_count(n, self.budget, name="budget")

    def partition(self, mid_scores: torch.Tensor, deep_scores: torch.Tensor, grid: tuple[int, int],
                  valid: torch.Tensor | None = None) -> HiPrunePartition:
        """Anchors, buffers and registers for [B, N] scores of the object and deep blocks.

        With a keep-ratio budget and a ``valid`` mask, the ratio applies to the valid tokens, which must
        then number the same in every row (one N' per call).
        """
        n = mid_scores.shape[-1]
        if valid is not None and isinstance(self.budget, float) and valid.dim() == 2 and valid.shape[0]:
            counts = valid.sum(dim=1)
            if bool((counts != counts[0]).any()):
                raise ValueError("valid: a keep-ratio budget needs the same number of valid tokens in every row")
            n = int(counts[0])
        return hiprune_partition(mid_scores, deep_scores, grid, self.budget_for(n), anchor_ratio=self.anchor_ratio,
                                 official_quirks=self.official_quirks, valid=valid)

    def select(self, mid_scores: torch.Tensor, deep_scores: torch.Tensor, grid: tuple[int, int],
               valid: torch.Tensor | None = None) -> torch.Tensor:
        """Kept indices [B, N'] (int64, sorted, unique) for [B, N] object- and deep-block scores."""
        return self.partition(mid_scores, deep_scores, grid, valid).keep
