"""The one-stage baseline LVLM_CSP is measured against: every image token enters the language model, and before
layer ``layer`` each image keeps the ``keep`` tokens the ``[SEG]`` token attends to most at layer ``layer - 1``
(LVLM_CSP's pruning stage alone, with no clustering or scattering before it). At equal image-token FLOPs it must keep
more tokens than LVLM_CSP does after ``L2``, since it pays for every token only in layers ``0 .. layer - 1``."""

from __future__ import annotations

from dataclasses import dataclass

from prunelab.common.reduction import Reduction
from prunelab.common.tokens import topk_sorted
from prunelab.common.validate import check_int
from prunelab.methods.lvlm_csp.method import _check_amount, _count
from prunelab.methods.lvlm_csp.selection import seg_scores

__all__ = ["SegPrune"]


@dataclass(frozen=True)
class SegPrune:
    """Top image tokens by the ``[SEG]`` row, once.

    Attributes:
        keep: the tokens per image from layer ``layer`` on: a count >= 1 or a share in (0, 1].
        layer: the first layer after the pruning (>= 1); the rows are read at layer ``layer - 1``.
        seg_token_id: the ``[SEG]`` token's id (several: rows averaged); ``None``: the prompt's last token.
    """

    keep: int | float = 32
    layer: int = 2
    seg_token_id: int | None = None

    def __post_init__(self):
        _check_amount(self.keep, "keep")
        object.__setattr__(self, "layer", check_int(self.layer, "layer", low=1))
        if self.seg_token_id is not None:
            object.__setattr__(self, "seg_token_id", check_int(self.seg_token_id, "seg_token_id", low=0))

    def vlm_plan(self):
        from prunelab.common.vlm_plan import Needs, Stage, VLMPlan

        key = self.seg_token_id if self.seg_token_id is not None else "last"
        return VLMPlan((Stage("llm", self._prune, layer=self.layer - 1, needs=Needs(rows=(key,)),
                              budget=lambda img: _count(self.keep, img.embeds.shape[0], "keep"),
                              name="[SEG]-attention pruning"),))

    def _prune(self, ctx) -> list[Reduction]:
        key = self.seg_token_id if self.seg_token_id is not None else "last"
        return [Reduction(topk_sorted(seg_scores(img.rows[key]), img.budget)[None], img.embeds.shape[0])
                for img in ctx.images]
