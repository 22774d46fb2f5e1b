"""RandomDrop: uniformly random patch tokens removed at a ViT pruning schedule (the ViT baseline at equal budget)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunelab.common.flops import ViTDims
from prunelab.common.reduction import Reduction
from prunelab.common.schedule import TokenSchedule
from prunelab.common.tokens import TokenLayout, topk_sorted
from prunelab.common.validate import check_int
from prunelab.common.vit import AttnRequest, AttnStats, ViTPlan


@dataclass(frozen=True)
class RandomDrop:
    """Remove uniformly random patch tokens at the same schedule as Zero-TPrune (same budget arguments).

    Every sample draws from its own generator seeded with ``seed`` at the first pruning block, so a sample's
    tokens do not depend on the batch it is in nor on the call (a batch gives what each sample gives alone).
    Samples of equal length therefore draw the same positions; pass another ``seed`` for an independent draw.
    It asks for no attention statistics, so every block keeps the fused attention path.
    """

    schedule: TokenSchedule | None = None
    keep_ratio: float | None = None
    gflops: float | None = None
    blocks: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self):
        from prunelab.methods.zero_tprune import ZeroTPrune

        ZeroTPrune(schedule=self.schedule, keep_ratio=self.keep_ratio, gflops=self.gflops, blocks=self.blocks)
        object.__setattr__(self, "seed", check_int(self.seed, "seed"))

    def vit_plan(self, dims: ViTDims, layout: TokenLayout) -> ViTPlan:
        from prunelab.methods.zero_tprune import resolve_schedule

        sched = resolve_schedule(dims, self.schedule, self.keep_ratio, self.gflops, self.blocks)
        sched.validate(dims.depth, dims.num_tokens, layout.num_prefix)
        removal = dict(zip(sched.blocks, sched.removals))
        gens: list[torch.Generator] = []

        def select(block: int, x: torch.Tensor, stats: AttnStats) -> Reduction:
            b, n, _ = x.shape
            p = layout.num_prefix
            if block == sched.blocks[0]:
                gens[:] = [torch.Generator().manual_seed(self.seed) for _ in range(b)]
            scores = torch.stack([torch.rand(n - p, generator=g) for g in gens]).to(x.device)
            kept = topk_sorted(scores, n - p - removal[block]) + p
            return Reduction(torch.cat([torch.arange(p, device=x.device).expand(b, -1), kept], dim=1), n)

        return ViTPlan({blk: AttnRequest() for blk in sched.blocks}, select,
                       sched.tokens_per_block(dims.depth, dims.num_tokens))
