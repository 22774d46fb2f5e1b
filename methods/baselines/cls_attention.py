"""CLSAttention: keep the patch tokens the class token attends to most (the attention-score baseline of the ViT family).

The importance of patch token i at a pruning block is the class token's attention to it, averaged over heads,
``mean_h A_h[CLS, i]``: the score EViT and the "attention from CLS" ablations of graph-based scores use. It runs
at Zero-TPrune's schedule and budgets, so it isolates what Zero-TPrune's attention graph (WPR over every
token's attention, the head filter, the similarity stage) adds over the class token's own row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunelab.common.flops import ViTDims
from prunelab.common.handle import UnsupportedModelError
from prunelab.common.reduction import Reduction
from prunelab.common.schedule import TokenSchedule
from prunelab.common.tokens import TokenLayout, topk_sorted
from prunelab.common.vit import AttnRequest, AttnStats, ViTPlan


@dataclass(frozen=True)
class CLSAttention:
    """Remove the patch tokens that receive the least attention from the class token (same budget arguments as
    Zero-TPrune). Needs a backbone with a class token; it asks for the attention probabilities at the pruning
    blocks only."""

    schedule: TokenSchedule | None = None
    keep_ratio: float | None = None
    gflops: float | None = None
    blocks: tuple[int, ...] | None = None

    def __post_init__(self):
        from prunelab.methods.zero_tprune import ZeroTPrune

        ZeroTPrune(schedule=self.schedule, keep_ratio=self.keep_ratio, gflops=self.gflops, blocks=self.blocks)

    def vit_plan(self, dims: ViTDims, layout: TokenLayout) -> ViTPlan:
        from prunelab.methods.zero_tprune import resolve_schedule

        if not layout.class_positions:
            raise UnsupportedModelError("CLSAttention scores tokens by the class token's attention; this model "
                                        "has no class token (use Zero-TPrune's uniform start or random drop)")
        sched = resolve_schedule(dims, self.schedule, self.keep_ratio, self.gflops, self.blocks)
        sched.validate(dims.depth, dims.num_tokens, layout.num_prefix)
        removal = dict(zip(sched.blocks, sched.removals))
        cls = layout.class_positions[0]

        def select(block: int, x: torch.Tensor, stats: AttnStats) -> Reduction:
            b, n, _ = x.shape
            p = layout.num_prefix
            if removal[block] == 0:
                return Reduction.keep_all(b, n, x.device)
            score = stats.probs[:, :, cls, p:].mean(dim=1)  # [B, n - p]
            if not torch.isfinite(score).all():
                raise ValueError(f"x: the attention entering CLSAttention at block {block} contains NaN or Inf")
            kept = topk_sorted(score, n - p - removal[block]) + p
            return Reduction(torch.cat([torch.arange(p, device=x.device).expand(b, -1), kept], dim=1), n)

        requests = {blk: AttnRequest(probs=removal[blk] > 0) for blk in sched.blocks}
        return ViTPlan(requests, select, sched.tokens_per_block(dims.depth, dims.num_tokens))
