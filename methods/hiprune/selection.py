"""HiPrune's tensor functions: attention received, anchor, buffer and register tokens.

Paper: Jizhihui Liu et al., *HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in
Vision-Language Models*, arXiv 2508.00553. Pure functions of tensors; they know no model.

Official code consulted: ``Danielement321/HiPrune`` (MIT), commit 6e83a12 (``encode_images`` in
``LLaVA/llava/model/llava_arch.py`` and the selection block of ``Qwen2_5_VL/qwen2_5_vl_HiPrune.py``).
It was read to match behaviour; nothing is copied. What differs (README.md has the full list):

- Buffers are true 2-D 4-neighbours on the patch grid. The official code offsets the flat index by
  +-1 and +-W, so +-1 wraps across row ends and out-of-range +-W are clamped to tokens 0 and N-1.
  ``official_quirks=True`` reproduces both.
- The anchor count rounds half up through :func:`prunelab.common.tokens.keep_count` (at least one anchor
  when alpha > 0). The official code uses Python's ``round`` (half to even), which can give 0 anchors.
  ``official_quirks=True`` reproduces it.
- Registers exclude anchors and buffers exactly. The official code subtracts 1 from their deep scores
  instead, which re-picks them when scores exceed 1 (Qwen2.5-VL sums over queries) and then keeps
  fewer than N' tokens. Not reproduced: it would break the exact-budget contract.
- When anchors and buffers alone exceed the budget (tiny budgets), the buffers with the best
  object-layer scores are kept. The official code fails there (``topk`` with a negative k).
- Batch > 1 and a ``valid`` mask for padded canvases; the official code loops over one image at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import torch

from prunelab.common.tokens import keep_count, topk_sorted

DEFAULT_ANCHOR_RATIO = 0.1
"""alpha, the budget share of anchors with their buffers (0.1 for every model: official README, hyperparameters)."""

NEIGHBOURS_PER_ANCHOR = 4
"""Anchors are counted as round(N' * alpha / (1 + 4)): each anchor brings at most four buffers (official
``encode_images``, ``LLaVA/llava/model/llava_arch.py``)."""


class Role(IntEnum):
    """Why a token was kept: the paper's three token types (abstract and method: anchor, buffer, register)."""

    ANCHOR = 0
    BUFFER = 1
    REGISTER = 2


def received_attention(attn: torch.Tensor, num_prefix: int = 0, *, query: str = "all") -> torch.Tensor:
    """Attention received by each patch, g_j = mean_h mean_i A_h[i, j] (official ``encode_images``).

    The score is CLS-free: for CLIP (``num_prefix=1``) the CLS column is dropped but the CLS query row
    still counts, as in the official code; for CLS-less encoders (Qwen2.5-VL, SigLIP) ``num_prefix=0``
    and every column is a patch. Qwen2.5-VL's official code sums over queries instead of averaging;
    that is the same ranking, and this function always averages.

    Args:
        attn: [B, H, T, T] softmax probabilities of one encoder block, T = num_prefix + N.
        num_prefix: leading non-patch tokens (CLS, registers) whose columns are dropped.
        query: ``"all"`` averages over every query (the paper and the code); ``"cls"`` reads the CLS row
            only, the variant left commented out in the official code (needs ``num_prefix >= 1``).

    Returns:
        [B, N] float32 scores.
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be [B, H, T, T] attention probabilities, got shape {tuple(attn.shape)}")
    if not 0 <= num_prefix < attn.shape[-1]:
        raise ValueError(f"num_prefix must be in [0, {attn.shape[-1]}), got {num_prefix}")
    if query == "all":
        # Accumulate in float32 without materialising a float32 copy of the [B, H, T, T] maps.
        g = attn.sum(dim=(1, 2), dtype=torch.float32) / (attn.shape[1] * attn.shape[2])
    elif query == "cls":
        if num_prefix < 1:
            raise ValueError("query='cls' needs a CLS token (num_prefix >= 1); CLS-less encoders use query='all'")
        g = attn[:, :, 0].sum(dim=1, dtype=torch.float32) / attn.shape[1]
    else:
        raise ValueError(f"query must be 'all' or 'cls', got {query!r}")
    return g[:, num_prefix:]


def merge_unit_scores(scores: torch.Tensor, unit: int = 4) -> torch.Tensor:
    """Average the scores of each spatial merge unit (Qwen2.5-VL: 2x2 patches -> one token; as the official
    ``Qwen2_5_VL/qwen2_5_vl_HiPrune.py`` does).

    Qwen2.5-VL's processor lays patches out merge-unit-major: the ``unit`` patches of one merged token are
    consecutive and the merged tokens follow in raster order, so the mean of each consecutive group is
    the merged token's score in raster order. (Undoing the vision tower's window permutation first is the
    adapter's job.)

    Args:
        scores: [B, N] per-patch scores in merge-unit-major order.
        unit: patches per merged token (spatial_merge_size ** 2).

    Returns:
        [B, N // unit] per-merged-token scores.
    """
    if unit < 1 or scores.dim() != 2 or scores.shape[1] % unit:
        raise ValueError(f"unit={unit} must be >= 1 and divide the token count of scores {tuple(scores.shape)}")
    return scores.reshape(scores.shape[0], -1, unit).mean(dim=-1)


def anchor_count(budget: int, anchor_ratio: float = DEFAULT_ANCHOR_RATIO, *, official_quirks: bool = False) -> int:
    """n_a = round(N' * alpha / 5), the number of anchors (official ``encode_images``).

    Ours rounds half up through ``keep_count`` and keeps at least one anchor when alpha > 0 (alpha = 0 is
    the registers-only ablation). ``official_quirks=True`` uses Python's ``round`` like the code: half to
    even, and 0 anchors whenever N' * alpha / 5 <= 0.5 (for example N' = 25 at alpha = 0.1).
    """
    _check_anchor_ratio(anchor_ratio)
    if official_quirks:
        return round(budget * anchor_ratio / (1 + NEIGHBOURS_PER_ANCHOR))
    if anchor_ratio == 0:
        return 0
    return keep_count(budget, anchor_ratio / (1 + NEIGHBOURS_PER_ANCHOR), name="anchor_ratio")


def anchor_tokens(mid_scores: torch.Tensor, n_anchors: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Anchors: the ``n_anchors`` tokens with the highest object-layer scores (paper, method: anchor tokens).

    Args:
        mid_scores: [B, N] attention received at the object-centric middle layer.
        n_anchors: anchors per sample, at most the valid tokens of every row.
        valid: [B, N] bool, tokens that may be chosen; None means all.

    Returns:
        [B, N] bool mask with exactly ``n_anchors`` True per row; ties go to the lower index.
    """
    key = mid_scores if valid is None else mid_scores.masked_fill(~valid, -math.inf)
    mask = torch.zeros(mid_scores.shape, dtype=torch.bool, device=mid_scores.device)
    return mask.scatter_(1, topk_sorted(key, n_anchors), True)


def buffer_tokens(anchors: torch.Tensor, grid: tuple[int, int], *, official_quirks: bool = False,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """Buffers: the grid 4-neighbours (left, right, up, down) of the anchors, anchors excluded (paper: buffer tokens).

    Ours: true 2-D neighbours; a token at a row end has no neighbour in the next row, and the top and
    bottom rows have no neighbour above or below. ``official_quirks=True`` reproduces the official flat
    indexing (``encode_images``): +-1 wraps across row ends, and an anchor in the top (bottom) row adds token 0
    (token N - 1), the clamp of its out-of-range -W (+W) neighbour.

    Args:
        anchors: [B, N] bool anchor mask, N = rows * cols in raster order.
        grid: (rows, cols) of the patch grid.
        official_quirks: reproduce the official neighbour indexing.
        valid: [B, N] bool; invalid tokens are never buffers.

    Returns:
        [B, N] bool buffer mask, disjoint from ``anchors``.
    """
    rows, cols = grid
    b, n = anchors.shape
    buf = torch.zeros_like(anchors)
    if official_quirks:
        buf[:, 1:] |= anchors[:, :-1]  # i + 1, also from the last column into the next row
        buf[:, :-1] |= anchors[:, 1:]  # i - 1, also from the first column into the previous row
        buf[:, cols:] |= anchors[:, :-cols]  # i + W
        buf[:, :-cols] |= anchors[:, cols:]  # i - W
        buf[:, 0] |= anchors[:, :cols].any(dim=1)  # i - W < 0 clamped to 0
        buf[:, n - 1] |= anchors[:, n - cols:].any(dim=1)  # i + W > N - 1 clamped to N - 1
    else:
        a, g = anchors.view(b, rows, cols), buf.view(b, rows, cols)
        g[:, :, 1:] |= a[:, :, :-1]  # right neighbour of each anchor, within its row
        g[:, :, :-1] |= a[:, :, 1:]  # left neighbour
        g[:, 1:] |= a[:, :-1]  # below
        g[:, :-1] |= a[:, 1:]  # above
    buf &= ~anchors
    return buf if valid is None else buf & valid


def best_in_mask(scores: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The ``counts[b]`` highest-scoring tokens of ``mask[b]`` per row; ties go to the lower index.

    Args:
        scores: [B, N] finite scores.
        mask: [B, N] bool candidates.
        counts: [B] int64, each at most the candidates of its row.

    Returns:
        [B, N] bool mask, a subset of ``mask`` with ``counts[b]`` True in row b.
    """
    order = torch.sort(scores.masked_fill(~mask, -math.inf), dim=-1, descending=True, stable=True).indices
    take = torch.arange(scores.shape[1], device=scores.device)[None, :] < counts[:, None]
    return torch.zeros_like(mask).scatter_(1, order, take)


def register_tokens(deep_scores: torch.Tensor, taken: torch.Tensor, budget: int,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """Registers: the best deep-layer tokens outside anchors and buffers, filling the budget (paper: register tokens).

    Args:
        deep_scores: [B, N] attention received at the deep layer.
        taken: [B, N] bool, anchors and buffers (at most ``budget`` per row).
        budget: N', kept tokens per sample.
        valid: [B, N] bool; invalid tokens are never registers.

    Returns:
        [B, N] bool mask, disjoint from ``taken``, with ``budget - taken[b].sum()`` True in row b.
    """
    free = ~taken if valid is None else valid & ~taken
    return best_in_mask(deep_scores, free, budget - taken.sum(dim=1))


@dataclass(frozen=True)
class HiPrunePartition:
    """The kept set of :func:`hiprune_partition`, split by role; three disjoint [B, N] bool masks."""

    anchor: torch.Tensor
    buffer: torch.Tensor
    register: torch.Tensor

    @property
    def kept(self) -> torch.Tensor:
        """[B, N] bool, the union of the three roles."""
        return self.anchor | self.buffer | self.register

    @property
    def keep(self) -> torch.Tensor:
        """[B, N'] int64 kept indices, sorted ascending and unique per row."""
        kept = self.kept
        return kept.nonzero()[:, 1].reshape(kept.shape[0], -1)  # row-major, so each row comes out sorted

    @property
    def roles(self) -> torch.Tensor:
        """[B, N'] int64 :class:`Role` of each index in :attr:`keep`."""
        code = self.buffer.long() * int(Role.BUFFER) + self.register.long() * int(Role.REGISTER)  # ANCHOR is 0
        return torch.gather(code, 1, self.keep)


def hiprune_partition(mid_scores: torch.Tensor, deep_scores: torch.Tensor, grid: tuple[int, int], budget: int,
                      *, anchor_ratio: float = DEFAULT_ANCHOR_RATIO, official_quirks: bool = False,
                      valid: torch.Tensor | None = None) -> HiPrunePartition:
    """HiPrune's selection (paper, method): anchors, their buffers, then registers up to N' exactly.

    Args:
        mid_scores: [B, N] attention received at the object-centric middle layer (CLIP block 9,
            Qwen2.5-VL block 16, 1-based; official README), e.g. from :func:`received_attention`.
        deep_scores: [B, N] attention received at the deep layer (CLIP: the penultimate, LLaVA's feature
            layer; Qwen2.5-VL: the last block; official code).
        grid: (rows, cols) of the patch grid, rows * cols = N, tokens in raster order.
        budget: N', tokens kept per sample, 1 <= N' <= N (and at most the valid tokens of every row).
        anchor_ratio: alpha in [0, 1]; anchors = round(N' * alpha / 5) (official code; 0.1 by default).
        official_quirks: reproduce the official code's anchor rounding and neighbour indexing (``encode_images``).
        valid: [B, N] bool, the real tokens of a padded canvas; None means all. Only valid tokens are kept.

    Returns:
        The partition; ``.keep`` is [B, N'] int64, ``.roles`` the role of each kept token.
    """
    _check_inputs(mid_scores, deep_scores, grid, budget, anchor_ratio, valid)
    n_a = anchor_count(budget, anchor_ratio, official_quirks=official_quirks)
    anchors = anchor_tokens(mid_scores, n_a, valid)
    buffers = buffer_tokens(anchors, grid, official_quirks=official_quirks, valid=valid)
    room = torch.clamp(buffers.sum(dim=1), max=budget - n_a)  # tiny budgets: keep the best-scored buffers
    buffers = best_in_mask(mid_scores, buffers, room)
    registers = register_tokens(deep_scores, anchors | buffers, budget, valid)
    return HiPrunePartition(anchors, buffers, registers)


def hiprune_select(mid_scores: torch.Tensor, deep_scores: torch.Tensor, grid: tuple[int, int], budget: int,
                   *, anchor_ratio: float = DEFAULT_ANCHOR_RATIO, official_quirks: bool = False,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """Kept indices [B, N'] (int64, sorted, unique) of :func:`hiprune_partition`; same arguments."""
    return hiprune_partition(mid_scores, deep_scores, grid, budget, anchor_ratio=anchor_ratio,
                             official_quirks=official_quirks, valid=valid).keep


def _check_anchor_ratio(anchor_ratio: float) -> None:
    if isinstance(anchor_ratio, bool) or not isinstance(anchor_ratio, (int, float)) or not 0 <= anchor_ratio <= 1:
        raise ValueError(f"anchor_ratio must be a number in [0, 1], got {anchor_ratio!r}")


def _check_inputs(mid_scores, deep_scores, grid, budget, anchor_ratio, valid) -> None:
    for name, s in (("mid_scores", mid_scores), ("deep_scores", deep_scores)):
        if not isinstance(s, torch.Tensor) or s.dim() != 2 or not s.is_floating_point():
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"{name} must be a float tensor [B, N], got {got}")
        if not bool(torch.isfinite(s).all()):  # -inf marks excluded tokens internally; NaN ranks arbitrarily
            raise ValueError(f"{name} contains NaN or Inf")
    if deep_scores.shape != mid_scores.shape:
        raise ValueError(f"deep_scores {tuple(deep_scores.shape)} must match mid_scores {tuple(mid_scores.shape)}")
    n = mid_scores.shape[1]
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid) or grid[0] * grid[1] != n):
        raise ValueError(f"grid must be (rows, cols) of positive ints with rows * cols = N = {n}, got {grid!r}")
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= n:
        raise ValueError(f"budget must be an int in [1, {n}], got {budget!r}")
    _check_anchor_ratio(anchor_ratio)
    if valid is not None:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or valid.shape != mid_scores.shape:
            got = (valid.dtype, tuple(valid.shape)) if isinstance(valid, torch.Tensor) else type(valid).__name__
            raise ValueError(f"valid must be a bool tensor of shape {tuple(mid_scores.shape)}, got {got}")
        fewest = int(valid.sum(dim=1).min()) if valid.shape[0] else n
        if budget > fewest:
            raise ValueError(f"budget {budget} exceeds the {fewest} valid tokens of some row")
