"""ToP-ViM: the method object (Zhan et al., "Exploring Token Pruning in Vision State Space Models", NeurIPS 2024,
arXiv 2409.18962). Official code compared: ZLKong/ToP-ViM at b5bc231 (Apache-2.0).

After each pruning block, tokens are scored by the SSM output before ``out_proj`` (:mod:`.importance`), the best
ones are kept with the middle CLS (:mod:`.selection`), and the later blocks run with the pruning-aware hidden-state
alignment (:mod:`.seam`). The defaults are the official Vim-S fine-tuning code's, hard-coded in its
``vim/models_mamba.py``: prune after the 1-based blocks 5, 10 and 15 of 24 at keep ratio 0.8 (197 -> 157 -> 125 ->
101 tokens). See README.md for every difference from the official code and its switch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunelab.common.reduction import Reduction
from prunelab.common.validate import check_choice, check_ints, check_real
from prunelab.methods.top_vim.importance import NORMS, SOURCES, channel_reduce, token_importance
from prunelab.methods.top_vim.plain_mamba import PlainSSMOutput
from prunelab.methods.top_vim.selection import SELECTIONS, select_tokens, vim_keep_count
from prunelab.methods.top_vim.vim import SSMOutputs

ALIGNMENTS = ("zero_slot", "decay_only", "gapped", "none")
PAPER_BLOCKS, PAPER_DEPTH = (5, 10, 15), 24  # official vim/models_mamba.py: layernum 5, 10, 15 of Vim-S's 24

__all__ = ["ToPViM", "ALIGNMENTS", "PAPER_BLOCKS", "PAPER_DEPTH", "scaled_blocks"]


def scaled_blocks(depth: int) -> tuple[int, ...]:
    """The official 5, 10, 15 of 24 at another depth: ``floor(b * depth / 24 + 0.5)`` (round half up), clamped to
    [1, depth - 1] (pruning after the last block changes nothing) and deduplicated. Depth 12: (3, 5, 8); depth 6:
    (1, 3, 4); depth 1: none."""
    return tuple(sorted({min(max(int(b * depth / PAPER_DEPTH + 0.5), 1), depth - 1)
                         for b in PAPER_BLOCKS} - {0}))


@dataclass(frozen=True)
class ToPViM:
    """ToP-ViM's hyperparameters.

    Attributes:
        keep_ratio: per pruning step, in (0, 1]; a step keeps ``ceil((n - 1) * keep_ratio)`` tokens (+1 if even)
            of the n it sees, the CLS included (official code: 0.8 for Vim-S; 1.0 keeps every token).
        blocks: 1-based blocks after whose output tokens are pruned, ascending, each below the model's depth.
            None: the official 5, 10, 15 for 24 blocks, scaled to other depths (:func:`scaled_blocks`).
        alignment: the pruning-aware hidden-state alignment (the paper's Sec. on alignment, Eq. 5-6 left open):
            ``"zero_slot"`` keeps every slot in the sequence and zeroes the pruned ones (the official commented-out
            masking code), ``"decay_only"`` also passes the keep mask to the later scans, where a pruned slot only
            decays the state, ``"gapped"`` is decay_only with the pruned slot's step ``softplus(dt_bias)``, computed
            on the kept tokens only (the fast path), ``"none"`` removes the pruned tokens (the official active path;
            the paper's naive pruning).
        importance_norm: ``"clip"`` (the paper's), ``"l1"``, ``"l2"`` or ``"none"`` (the paper's ablation; the
            official active path sums without clipping).
        importance_source: ``"both"`` directions (default), ``"forward"``, ``"backward"``, or
            ``"official_bwd_unflipped"`` (the official bug: the backward output scored in its flipped frame).
        selection: ``"global"`` top-k (the paper's), ``"balanced"`` (half the patches on each side of the CLS) or
            ``"official"`` (global, the CLS moved to the middle of the shorter sequence; ``alignment="none"``
            only). See :mod:`.selection`.
    """

    keep_ratio: float = 0.8
    blocks: tuple[int, ...] | None = None
    alignment: str = "zero_slot"
    importance_norm: str = "clip"
    importance_source: str = "both"
    selection: str = "global"

    def __post_init__(self):
        object.__setattr__(self, "keep_ratio", check_real(self.keep_ratio, "keep_ratio", low=0.0, high=1.0,
                                                          low_open=True))
        if self.blocks is not None:
            blocks = check_ints(self.blocks, "blocks", low=1)
            if list(blocks) != sorted(set(blocks)):
                raise ValueError(f"blocks: expected ascending, unique 1-based block numbers, got {blocks}")
            object.__setattr__(self, "blocks", blocks)
        check_choice(self.alignment, "alignment", ALIGNMENTS)
        check_choice(self.importance_norm, "importance_norm", NORMS)
        check_choice(self.importance_source, "importance_source", SOURCES)
        check_choice(self.selection, "selection", SELECTIONS)
        if self.selection == "official" and self.alignment != "none":
            raise ValueError(f"selection: 'official' moves the CLS to the middle of the shorter sequence, which only "
                             f"exists under alignment='none' (got alignment={self.alignment!r})")

    @classmethod
    def official(cls, **overrides) -> ToPViM:
        """The official code's active path: physical removal, the unclipped sum of the unflipped backward output,
        the CLS moved to the middle (the batch-row-0 CLS bug and the print/exit are not reproduced)."""
        settings = dict(alignment="none", importance_norm="none", importance_source="official_bwd_unflipped",
                        selection="official")
        return cls(**{**settings, **overrides})

    def prune_blocks(self, depth: int) -> tuple[int, ...]:
        """The 1-based blocks that prune in a model of ``depth`` blocks (an error naming ``blocks`` if outside)."""
        if self.blocks is None:
            return scaled_blocks(depth)
        if self.blocks and self.blocks[-1] >= depth:
            raise ValueError(f"blocks: {self.blocks[-1]} is not below the model's depth {depth} (pruning after the "
                             "last block changes nothing)")
        return self.blocks

    def importance(self, ssm: SSMOutputs | PlainSSMOutput) -> torch.Tensor:
        """S [B, L] from one mixer's scan outputs (:func:`.importance.token_importance`; for PlainMamba, the
        channel reduction of its gated scan output)."""
        if isinstance(ssm, PlainSSMOutput):
            with torch.no_grad():
                return channel_reduce(ssm.y.float(), self.importance_norm)
        return token_importance(ssm, self.importance_norm, self.importance_source)

    def select(self, scores: torch.Tensor, cls_index: torch.Tensor | int,
               alive: torch.Tensor | None = None) -> Reduction:
        """The slots that stay after a pruning block (:func:`.selection.select_tokens`)."""
        return select_tokens(scores, cls_index, self.keep_ratio, alive=alive, selection=self.selection)

    def tokens_per_block(self, num_tokens: int, depth: int, count=vim_keep_count) -> list[int]:
        """Tokens each of the ``depth`` blocks computes for a sequence of ``num_tokens`` (CLS included), a pruning
        step keeping ``count(n, keep_ratio)`` of n (PlainMamba: :func:`.selection.plain_keep_count`)."""
        after, n, tokens = set(self.prune_blocks(depth)), num_tokens, []
        for block in range(1, depth + 1):
            tokens.append(n)
            if block in after:
                n = count(n, self.keep_ratio)
        return tokens

    def slots_per_block(self, num_tokens: int, depth: int) -> list[int]:
        """Sequence slots each block's scans walk: all of them under zero_slot and decay_only, the kept tokens under
        "gapped" (the gaps decay in one step with the next kept token) and "none"."""
        if self.alignment in ("none", "gapped"):
            return self.tokens_per_block(num_tokens, depth)
        return [num_tokens] * depth
