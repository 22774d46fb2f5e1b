"""Zero-TPrune (Wang, Dedhia, Jha, CVPR 2024): zero-shot ViT token pruning on the attention graph.

One pruning layer runs I' -> S -> I on the attention probabilities and keys of its block:

- I': one WPR iteration ranks the tokens (nothing is removed);
- S: the less important half (group A) loses its ``r_s`` tokens most similar to the other half;
- I: full WPR on the survivors' attention graph; the ``r_i`` lowest-scoring patch tokens go.

No official code exists; see README.md for every open point and the choice made here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from prunelab.common.flops import ViTDims
from prunelab.common.reduction import Reduction
from prunelab.common.schedule import TokenSchedule, default_prune_blocks
from prunelab.common.tokens import TokenLayout, topk_sorted
from prunelab.common.validate import check_bool, check_ints, check_real
from prunelab.common.vit import AttnRequest, AttnStats, ViTPlan
from prunelab.methods.zero_tprune.wpr import (
    aggregate_heads,
    initial_distribution,
    restrict_attention,
    similarity_prune,
    wpr_scores,
)

PAPER_FLOPS_REDUCTION = 0.347  # abstract: DeiT-S FLOPs -34.7 % (4.6 -> 3.0 GFLOPs)


def resolve_schedule(dims: ViTDims, schedule: TokenSchedule | None, keep_ratio: float | None,
                     gflops: float | None, blocks: tuple[int, ...] | None) -> TokenSchedule:
    """One budget, given one of four ways; the default is the paper's -34.7 % FLOPs operating point."""
    given = [name for name, v in (("schedule", schedule), ("keep_ratio", keep_ratio), ("gflops", gflops))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"give one budget, not {' and '.join(given)}")
    blocks = blocks if blocks is not None else default_prune_blocks(dims.depth)
    if schedule is not None:
        return schedule
    if keep_ratio is not None:
        return TokenSchedule.from_keep_ratio(keep_ratio, dims.num_patches, blocks)
    if gflops is None:
        from prunelab.common.flops import vit_gflops

        gflops = (1 - PAPER_FLOPS_REDUCTION) * vit_gflops(dims)
    return TokenSchedule.for_gflops(dims, gflops, blocks)


@dataclass(frozen=True)
class ZeroTPrune:
    """Zero-TPrune's hyperparameters; defaults are the paper's where it states them.

    Budget (give at most one; default: the paper's -34.7 % FLOPs, i.e. 3.0 GFLOPs on DeiT-S):

    Attributes:
        schedule: explicit token counts per pruning block.
        keep_ratio: fraction of patch tokens each pruning block keeps (per stage).
        gflops: a FLOPs target (analytic, MAC convention) solved into per-stage counts.
        blocks: pruning blocks (0-based, output pruned); default 1/4, 1/2, 3/4 depth [open].
        similarity_share: fraction of each block's removals done by the S-stage, rest by the I-stage [open].
        iterations: WPR iterations in the first three / middle / last three blocks; the paper uses 30-50,
            5-10 and 1.
        cls_boost: start CLS (and distillation) tokens at sqrt(N) x the others; False = Zero-TPrune-uni.
        vhf_band: variance band of VHF on mean-1 scores, [0.01, 0.7] (VHF, Fig. 16); None disables VHF.
        renormalize: re-normalise attention rows among the survivors before the I-stage [open].
    """

    schedule: TokenSchedule | None = None
    keep_ratio: float | None = None
    gflops: float | None = None
    blocks: tuple[int, ...] | None = None
    similarity_share: float = 0.5
    iterations: tuple[int, int, int] = (30, 5, 1)
    cls_boost: bool = True
    vhf_band: tuple[float, float] | None = (0.01, 0.7)
    renormalize: bool = True

    def __post_init__(self):
        put = functools.partial(object.__setattr__, self)
        if self.schedule is not None and not isinstance(self.schedule, TokenSchedule):
            raise ValueError(f"schedule: expected a TokenSchedule, got {type(self.schedule).__name__}")
        if self.keep_ratio is not None:
            put("keep_ratio", check_real(self.keep_ratio, "keep_ratio", low=0.0, high=1.0, low_open=True))
        if self.gflops is not None:
            put("gflops", check_real(self.gflops, "gflops", low=0.0, low_open=True))
        if self.blocks is not None:
            put("blocks", check_ints(self.blocks, "blocks", low=0))
        put("similarity_share", check_real(self.similarity_share, "similarity_share", low=0.0, high=1.0))
        put("iterations", check_ints(self.iterations, "iterations", low=1))
        if len(self.iterations) != 3:
            raise ValueError(f"iterations: expected three counts >= 1 (early, middle, late), got {self.iterations}")
        put("cls_boost", check_bool(self.cls_boost, "cls_boost"))
        put("renormalize", check_bool(self.renormalize, "renormalize"))
        if self.vhf_band is not None:
            band = tuple(check_real(v, f"vhf_band[{i}]", low=0.0) for i, v in enumerate(self.vhf_band))
            if len(band) != 2 or band[0] > band[1]:
                raise ValueError(f"vhf_band: expected (low, high) with 0 <= low <= high, got {self.vhf_band}")
            put("vhf_band", band)

    def iterations_at(self, block: int, depth: int) -> int:
        early, middle, late = self.iterations
        return early if block < 3 else late if block >= depth - 3 else middle

    def vit_plan(self, dims: ViTDims, layout: TokenLayout) -> ViTPlan:
        sched = resolve_schedule(dims, self.schedule, self.keep_ratio, self.gflops, self.blocks)
        sched.validate(dims.depth, dims.num_tokens, layout.num_prefix)
        counts = {}
        for block, r in zip(sched.blocks, sched.removals):
            r_s = int(round(self.similarity_share * r))
            counts[block] = (r_s, r - r_s)
        n = dims.num_tokens - layout.num_prefix
        for block, (r_s, _) in counts.items():  # the S-stage can only take from group A
            if r_s > n // 2:
                raise ValueError(f"schedule: the S-stage at block {block} would remove {r_s} of the "
                                 f"{n // 2} tokens in group A; lower similarity_share or the removal")
            n -= sum(counts[block])
        requests = {b: AttnRequest(probs=any(counts[b]), keys=counts[b][0] > 0) for b in counts}
        select = functools.partial(self._select, counts, layout, dims.depth)
        return ViTPlan(requests, select, sched.tokens_per_block(dims.depth, dims.num_tokens))

    def _select(self, counts, layout: TokenLayout, depth: int, block: int, x: torch.Tensor,
                stats: AttnStats) -> Reduction:
        r_s, r_i = counts[block]
        b, n, _ = x.shape
        if r_s == r_i == 0:
            return Reduction.keep_all(b, n, x.device)
        if not torch.isfinite(x.sum()):  # one reduction: NaN or Inf anywhere makes the sum non-finite
            raise ValueError(f"x: the activations entering Zero-TPrune at block {block} contain NaN or Inf")
        p = layout.num_prefix
        keep = torch.arange(n, device=x.device).expand(b, -1)
        attn, row_scale = stats.probs, None
        if r_s:  # I' then S
            s0 = initial_distribution(n, layout.class_positions, b, cls_boost=self.cls_boost, device=x.device)
            importance = aggregate_heads(wpr_scores(attn, s0, 1), self.vhf_band)
            keep = similarity_prune(stats.keys, importance, r_s, p)
            attn = restrict_attention(attn, keep, renormalize=False)
            row_scale = attn.sum(dim=-1).reciprocal() if self.renormalize else None
        if r_i:  # I
            m = keep.shape[1]
            s0 = initial_distribution(m, layout.class_positions, b, cls_boost=self.cls_boost, device=x.device)
            iters = self.iterations_at(block, depth)
            score = aggregate_heads(wpr_scores(attn, s0, iters, row_scale), self.vhf_band)
            kept_patches = topk_sorted(score[:, p:], m - p - r_i) + p
            prefix = torch.arange(p, device=x.device).expand(b, -1)
            keep = torch.gather(keep, 1, torch.cat([prefix, kept_patches], dim=1))
        return Reduction(keep, n)
