"""Token schedules for ViT pruners: which blocks prune and how many tokens each removes.

A schedule counts tokens, not ratios, so a batch keeps the same count per image and results are exact
and reproducible. Two ways to build one:

- :meth:`TokenSchedule.from_keep_ratio`: each pruning block keeps ``keep_ratio`` of the patch tokens
  that reach it (DynamicViT's per-stage convention), counts from :func:`~prunelab.common.tokens.keep_count`;
- :meth:`TokenSchedule.for_gflops`: the largest per-stage keep ratio whose analytic FLOPs stay within a
  GFLOPs target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prunelab.common.flops import ViTDims, vit_gflops
from prunelab.common.tokens import keep_count
from prunelab.common.validate import check_ints


def default_prune_blocks(depth: int) -> tuple[int, ...]:
    """Blocks (0-based) at 1/4, 1/2 and 3/4 depth: DeiT's 12 blocks give (2, 5, 8), i.e. after blocks 3, 6, 9."""
    if depth < 4:
        raise ValueError(f"depth must be >= 4 for the default pruning blocks, got {depth}")
    return tuple(sorted({round(depth * f) - 1 for f in (0.25, 0.5, 0.75)}))


@dataclass(frozen=True)
class TokenSchedule:
    """``removals[i]`` tokens are removed from the output of block ``blocks[i]`` (0-based).

    Removal counts are of patch tokens: prefix tokens (CLS, distillation, registers) are never removed.
    """

    blocks: tuple[int, ...]
    removals: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "blocks", check_ints(self.blocks, "schedule.blocks"))
        object.__setattr__(self, "removals", check_ints(self.removals, "schedule.removals"))
        if len(self.blocks) != len(self.removals):
            raise ValueError(f"schedule: {len(self.blocks)} blocks but {len(self.removals)} removal counts")
        if list(self.blocks) != sorted(set(self.blocks)) or any(b < 0 for b in self.blocks):
            raise ValueError(f"schedule: blocks must be unique, non-negative and ascending, got {self.blocks}")
        if any(r < 0 for r in self.removals):
            raise ValueError(f"schedule: removal counts must be >= 0, got {self.removals}")

    @classmethod
    def from_keep_ratio(cls, keep_ratio: float, num_patches: int, blocks: Sequence[int]) -> TokenSchedule:
        """Each pruning block keeps ``keep_count(patches_in, keep_ratio)`` of the patch tokens reaching it."""
        removals, n = [], num_patches
        for _ in blocks:
            kept = keep_count(n, keep_ratio)
            removals.append(n - kept)
            n = kept
        return cls(tuple(blocks), tuple(removals))

    @classmethod
    def for_gflops(cls, dims: ViTDims, gflops: float, blocks: Sequence[int] | None = None) -> TokenSchedule:
        """The largest per-stage keep ratio whose analytic GFLOPs do not exceed ``gflops``."""
        blocks = tuple(blocks) if blocks is not None else default_prune_blocks(dims.depth)
        dense = vit_gflops(dims)
        if not 0 < gflops:
            raise ValueError(f"gflops must be > 0, got {gflops}")
        if gflops >= dense:
            return cls(blocks, (0,) * len(blocks))

        def cost(ratio):
            sched = cls.from_keep_ratio(ratio, dims.num_patches, blocks)
            return vit_gflops(dims, sched.tokens_per_block(dims.depth, dims.num_tokens)), sched

        lowest, sched = cost(1e-6)
        if lowest > gflops:
            raise ValueError(f"gflops={gflops} is below {lowest:.3f}, the cost of keeping one patch token per stage")
        lo, hi = 1e-6, 1.0  # cost(lo) <= gflops < cost(hi)
        for _ in range(60):
            mid = (lo + hi) / 2
            if cost(mid)[0] <= gflops:
                lo = mid
            else:
                hi = mid
        return cost(lo)[1]

    def validate(self, depth: int, num_tokens: int, num_prefix: int) -> None:
        """Raise if a block is outside the model or a stage removes more patch tokens than it has."""
        if self.blocks and self.blocks[-1] >= depth:
            raise ValueError(f"schedule: block {self.blocks[-1]} is outside the model's {depth} blocks")
        n = num_tokens - num_prefix
        for block, r in zip(self.blocks, self.removals):
            if r >= n:
                raise ValueError(
                    f"schedule: block {block} removes {r} tokens but only {n} patch tokens reach it "
                    "(at least one must remain)"
                )
            n -= r

    def tokens_per_block(self, depth: int, num_tokens: int) -> list[int]:
        """Tokens entering each of ``depth`` blocks (pruning after block b changes block b+1's input)."""
        tokens, n, removal = [], num_tokens, dict(zip(self.blocks, self.removals))
        for b in range(depth):
            tokens.append(n)
            n -= removal.get(b, 0)
        return tokens

    def __str__(self) -> str:
        return ", ".join(f"after block {b + 1}: -{r}" for b, r in zip(self.blocks, self.removals))
