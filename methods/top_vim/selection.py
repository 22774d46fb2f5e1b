"""ToP-ViM's token selection for Vim's middle-CLS sequence (pure functions, no model).

Paper: Zhan et al., "Exploring Token Pruning in Vision State Space Models", NeurIPS 2024 (arXiv 2409.18962). Official
code compared: ZLKong/ToP-ViM at b5bc231, ``vim/models_mamba.py`` (the active pruning block and the commented-out
masking variant).

The count rule is the official code's, not prunelab's common ``keep_count``: a sequence of n tokens (CLS included)
keeps ``k = ceil((n - 1) * keep_ratio)`` tokens, plus one when that is even, so k is odd and counts the CLS; the CLS
is never a candidate (excluded in every batch row: the official code excludes it only in row 0). Vim-S: 197 -> 157 ->
125 -> 101 at 0.8. Two deliberate differences: a keep ratio of exactly 1 keeps every token (the rule would drop a
patch of an odd grid, whose sequence is even), and the product is taken with a 1e-9 tolerance so that e.g.
0.7 * 10 = 7.000000000000001 keeps 7, not 8.

Which k - 1 patches stay (``selection``):

- ``"global"`` (default): the k - 1 best-scoring patches of the whole sequence, as the paper and the official code
  select them. The kept indices are returned sorted, so the CLS keeps its place in the order: under the aligned
  modes (slots kept) that place is the centre of the scanned sequence, as in the official masking variant; after
  physical removal it can end off-centre, and callers track it.
- ``"balanced"``: the (k - 1) / 2 best patches before the CLS and the (k - 1) / 2 best after it. Only this rule gives
  at once ascending indices, the CLS at the exact middle (index k // 2) of the kept sequence, and the same kept set
  under every alignment; it departs from the paper's top-k by that constraint.
- ``"official"``: the global choice, then the CLS inserted between the first (k - 1) / 2 and the last (k - 1) / 2
  kept patches, as the official active path builds its shorter sequence. The CLS is moved: the indices are in
  sequence order and not ascending when the split is unbalanced, which breaks prunelab's kept-token contract; it only
  makes sense under physical removal.
"""

from __future__ import annotations

import math

import torch

from prunelab.common.reduction import Reduction, check_reduction
from prunelab.common.tokens import TokenLayout
from prunelab.common.validate import check_choice, check_int, check_real

SELECTIONS = ("global", "balanced", "official")

__all__ = ["SELECTIONS", "vim_keep_count", "select_tokens", "cls_slot", "cls_layout", "check_vim_reduction",
           "plain_keep_count", "select_plain"]


def vim_keep_count(n: int, keep_ratio: float) -> int:
    """Tokens kept (CLS included, always odd unless all n are kept) from a sequence of ``n`` tokens, CLS included."""
    n = check_int(n, "n", low=1)
    keep_ratio = check_real(keep_ratio, "keep_ratio", low=0.0, high=1.0, low_open=True)
    if keep_ratio == 1.0:
        return n
    k = max(1, math.ceil((n - 1) * keep_ratio - 1e-9))
    return k + 1 if k % 2 == 0 else k


def _ranked(scores: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """Indices [B, count] of the best candidates per row, sorted ascending (ties to the lower index)."""
    key = scores.masked_fill(~candidates, float("-inf"))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :count]
    return order.sort(dim=1).values


def select_tokens(scores: torch.Tensor, cls_index: torch.Tensor | int, keep_ratio: float, *,
                  alive: torch.Tensor | None = None, selection: str = "global") -> Reduction:
    """One ToP-ViM pruning step on a sequence of L slots: which slots stay.

    Args:
        scores: [B, L] token importance S (index t scores slot t).
        cls_index: [B] int64 (or one int for every row), the CLS slot of each row.
        keep_ratio: in (0, 1]; the count follows :func:`vim_keep_count` of the alive tokens.
        alive: [B, L] bool, the slots still holding a token (the aligned modes keep pruned slots in the sequence);
            None: every slot. Every row must hold the same number of tokens.
        selection: ``"global"``, ``"balanced"`` or ``"official"`` (module docstring).

    Returns:
        A :class:`Reduction` of the L slots keeping k per row, the CLS included: ascending indices for
        ``"global"`` and ``"balanced"``, the official sequence order for ``"official"``.
    """
    check_choice(selection, "selection", SELECTIONS)
    if scores.dim() != 2:
        raise ValueError(f"scores: expected [B, L], got {tuple(scores.shape)}")
    B, L = scores.shape
    dev = scores.device
    cls = torch.as_tensor(cls_index, dtype=torch.int64, device=dev).expand(B)
    if bool(((cls < 0) | (cls >= L)).any()):
        raise ValueError(f"cls_index: expected slots in [0, {L}), got {cls.tolist()}")
    if alive is None:
        alive = torch.ones(B, L, dtype=torch.bool, device=dev)
    elif alive.shape != (B, L) or alive.dtype != torch.bool:
        raise ValueError(f"alive: expected bool [B={B}, L={L}], got {alive.dtype} {tuple(alive.shape)}")
    counts = alive.sum(1)
    if bool((counts != counts[0]).any()) or not bool(alive.gather(1, cls[:, None]).all()):
        raise ValueError(f"alive: every row must hold the same number of tokens, its CLS among them; got counts "
                         f"{counts.tolist()}")
    k = vim_keep_count(int(counts[0]), keep_ratio)
    slots = torch.arange(L, device=dev).expand(B, L)
    if k == int(counts[0]):  # nothing to prune (keep_ratio 1): every alive slot, in order
        return Reduction(torch.sort(torch.where(alive, slots, L), dim=1).values[:, :k], L)
    candidates = alive & (slots != cls[:, None])  # the CLS is excluded in every row
    scores = scores.float()
    if selection == "balanced":
        half = (k - 1) // 2
        before, after = candidates & (slots < cls[:, None]), candidates & (slots > cls[:, None])
        short = int(min(before.sum(1).min(), after.sum(1).min()))
        if half > short:
            raise ValueError(f"selection: 'balanced' keeps {half} patches on each side of the CLS, but a row has only "
                             f"{short} on one side")
        keep = torch.cat([_ranked(scores, before, half), cls[:, None], _ranked(scores, after, half)], dim=1)
    else:
        patches = _ranked(scores, candidates, k - 1)
        if selection == "official":
            # the official code splits the kept patches in two halves by count and puts the CLS between them
            half = (k - 1) // 2
            keep = torch.cat([patches[:, :half], cls[:, None], patches[:, half:]], dim=1)
        else:
            keep = torch.cat([patches, cls[:, None]], dim=1).sort(dim=1).values
    return Reduction(keep, L)


def cls_slot(red: Reduction, cls_index: torch.Tensor | int) -> torch.Tensor:
    """[B] int64: where the CLS (slot ``cls_index`` before the step) sits in the kept sequence."""
    cls = torch.as_tensor(cls_index, dtype=torch.int64, device=red.keep.device).expand(red.keep.shape[0])
    hit = red.keep == cls[:, None]
    if not bool(hit.any(1).all()):
        raise ValueError("keep: a row dropped its CLS token")
    return hit.int().argmax(1)


def cls_layout(n: int, cls_index: int, grid: tuple[int, int] | None = None) -> TokenLayout:
    """The :class:`TokenLayout` of a Vim sequence of ``n`` tokens whose CLS is at ``cls_index`` (protected).

    ``grid``: the patch grid of the full sequence; None after pruning, where the patches form one row.
    """
    return TokenLayout(n, (cls_index,), (cls_index,), grid if grid is not None else (1, n - 1))


def check_vim_reduction(red: Reduction, cls_index: torch.Tensor | int, *, grid: tuple[int, int] | None = None,
                        name: str = "keep") -> None:
    """:func:`check_reduction` with the layout protecting each row's CLS (rows may hold it at different slots)."""
    cls = torch.as_tensor(cls_index, dtype=torch.int64, device=red.keep.device).expand(red.keep.shape[0])
    for c in cls.unique().tolist():
        rows = cls == c
        check_reduction(Reduction(red.keep[rows], red.n), layout=cls_layout(red.n, c, grid), name=name)


def plain_keep_count(n: int, keep_ratio: float) -> int:
    """Tokens kept of ``n`` in a sequence without CLS (PlainMamba): ``ceil(n * keep_ratio)``, at least 1; the
    official rule without the CLS and the odd length it forces (1e-9 tolerance as in :func:`vim_keep_count`)."""
    n = check_int(n, "n", low=1)
    keep_ratio = check_real(keep_ratio, "keep_ratio", low=0.0, high=1.0, low_open=True)
    return n if keep_ratio == 1.0 else max(1, math.ceil(n * keep_ratio - 1e-9))


def select_plain(scores: torch.Tensor, keep_ratio: float) -> Reduction:
    """One ToP-ViM pruning step on a sequence without CLS: the :func:`plain_keep_count` best tokens per row, in
    ascending order (ties to the lower index). ``scores``: [B, K]."""
    if scores.dim() != 2:
        raise ValueError(f"scores: expected [B, K], got {tuple(scores.shape)}")
    B, K = scores.shape
    k = plain_keep_count(K, keep_ratio)
    everything = torch.ones(B, K, dtype=torch.bool, device=scores.device)
    return Reduction(_ranked(scores.float(), everything, k), K)
