"""The kept-token contract as a value: a :class:`Reduction` says which tokens of a sequence survive one step.

Every method returns one per pruning step, and every seam applies it the same way:

- ``keep`` [B, K]: int64 indices into the step's input, sorted ascending and unique per row (order matters for
  RoPE and scans). Rows may keep different counts (DToP's exits, per-image budgets): ``valid`` [B, K] then marks
  the real slots, which come first in each row; the padding slots repeat the row's last kept index so that a
  gather stays in range, and their rows are to be ignored.
- ``merge`` (optional): dropped tokens folded into kept ones, as ToMe-style and VisionDrop-style merging do; each
  kept token becomes the weighted mean of itself (weight 1) and the tokens merged into it, or with
  ``average=False`` itself plus the weighted sum of them (VisionDrop's "target + mean of its members" is weights
  ``1 / members``).
- :meth:`Reduction.gather` applies the step to any tensor laid out along the same sequence (hidden states,
  residuals, positions, token ids); :meth:`Reduction.scatter` is its inverse (a DToP canvas, re-activated tokens);
  :meth:`Reduction.then` composes two steps into indices of the original sequence.

:func:`check_reduction` enforces the contract, including protected positions (:class:`TokenLayout`) at any place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunelab.common.tokens import TokenLayout

__all__ = ["Merge", "Reduction", "check_reduction"]


@dataclass(frozen=True)
class Merge:
    """Dropped tokens folded into kept ones.

    Attributes:
        src: [B, D] int64 positions (in the step's input) of dropped tokens that are merged.
        dst: [B, D] int64 slots in ``keep`` (0..K-1) they merge into.
        weight: [B, D] float weights (>= 0); a kept token has weight 1. Zero weight ignores an entry (padding).
        average: True: the kept token becomes the weighted mean of itself and its merged tokens; False: itself
            plus their weighted sum.
    """

    src: torch.Tensor
    dst: torch.Tensor
    weight: torch.Tensor
    average: bool = True


@dataclass(frozen=True)
class Reduction:
    """One pruning step on a [B, N, ...] token sequence (see the module docstring for the contract).

    Attributes:
        keep: [B, K] int64 kept indices.
        n: tokens before the step (N).
        valid: [B, K] bool, real slots of ragged rows; ``None`` when every row keeps K.
        merge: optional :class:`Merge`.
    """

    keep: torch.Tensor
    n: int
    valid: torch.Tensor | None = None
    merge: Merge | None = None

    @classmethod
    def keep_all(cls, batch: int, n: int, device=None) -> Reduction:
        return cls(torch.arange(n, device=device).expand(batch, n), n)

    @property
    def counts(self) -> torch.Tensor:
        """[B] tokens kept per row."""
        if self.valid is None:
            return torch.full((self.keep.shape[0],), self.keep.shape[1], dtype=torch.int64, device=self.keep.device)
        return self.valid.sum(-1)

    @property
    def is_identity(self) -> bool:
        """True when every row keeps every token in order and nothing is merged."""
        return (self.merge is None and self.valid is None and self.keep.shape[1] == self.n
                and bool((self.keep == torch.arange(self.n, device=self.keep.device)).all()))

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """``x`` (batch first, sequence along ``dim``: [B, N, ...] or [B, H, N, d]) reduced to K tokens per row,
        merges folded in. A tensor whose batch dimension has size 1 (shared rotary tables) is broadcast over rows.
        """
        if self.is_identity:
            return x
        x = x.movedim(dim, 1)  # [B, N, ...]
        rows = torch.arange(self.keep.shape[0], device=x.device)[:, None]
        src = x.expand(self.keep.shape[0], *x.shape[1:])
        out = src[rows, self.keep]
        if self.merge is not None:
            out = _fold(out, src, self.merge)
        return out.movedim(1, dim)

    def apply(self, *xs: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, ...]:
        """:meth:`gather` of several tensors laid out along the same sequence."""
        return tuple(self.gather(x, dim) for x in xs)

    def scatter(self, base: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`gather`: a copy of ``base`` [B, N, ...] with ``values`` [B, K, ...] at the kept rows
        (padding slots of ragged rows are not written)."""
        out = base.clone()
        B, K, dev = *self.keep.shape, self.keep.device
        b, k = (self.valid.nonzero(as_tuple=True) if self.valid is not None
                else torch.meshgrid(torch.arange(B, device=dev), torch.arange(K, device=dev), indexing="ij"))
        out[b, self.keep[b, k]] = values[b, k].to(out.dtype)
        return out

    def then(self, later: Reduction) -> Reduction:
        """The two steps as one: ``later`` indexes this step's output; the result indexes this step's input.

        Merges do not compose (a merged token is no longer one of the input's tokens): both must be plain drops.
        """
        if self.merge is not None or later.merge is not None:
            raise ValueError("reduction: merging steps do not compose into one index set")
        if later.n != self.keep.shape[1]:
            raise ValueError(f"reduction: the later step reduces {later.n} tokens, this one keeps {self.keep.shape[1]}")
        keep = torch.gather(self.keep, 1, later.keep)
        valid = later.valid
        if self.valid is not None:
            inner = torch.gather(self.valid, 1, later.keep)
            valid = inner if valid is None else valid & inner
        return Reduction(keep, self.n, valid)

    def layout_after(self, layout: TokenLayout) -> TokenLayout:
        """Where the protected tokens are after this step (rows must agree, as protected tokens are always kept)."""
        row = self.keep[0].tolist()
        where = {p: i for i, p in enumerate(row)}
        return TokenLayout(len(row), tuple(where[p] for p in layout.protected),
                           tuple(where[p] for p in layout.class_positions), layout.grid)


def _fold(kept: torch.Tensor, x: torch.Tensor, merge: Merge) -> torch.Tensor:
    """Kept tokens [B, K, ...] averaged with the tokens merged into them (weight 1 for the kept token), or plus
    their weighted sum (``merge.average`` False)."""
    B, K = kept.shape[:2]
    rows = torch.arange(B, device=x.device)[:, None]
    w = merge.weight.to(kept.dtype)
    extra = w.view(*w.shape, *[1] * (kept.dim() - 2)) * x[rows, merge.src]
    total = torch.zeros_like(kept).index_put_((rows.expand_as(merge.dst), merge.dst), extra, accumulate=True)
    if not merge.average:
        return kept + total
    norm = torch.ones(B, K, dtype=kept.dtype, device=x.device).index_put_((rows.expand_as(merge.dst), merge.dst), w,
                                                                           accumulate=True)
    return (kept + total) / norm.view(B, K, *[1] * (kept.dim() - 2))


def check_reduction(red: Reduction, n: int | None = None, *, layout: TokenLayout | None = None,
                    name: str = "keep") -> None:
    """Raise a ``ValueError`` naming ``name`` if ``red`` breaks the kept-token contract for ``n`` tokens.

    Checks dtype and shape, range, ascending unique indices among each row's real slots (which come first),
    protected positions of ``layout`` kept in every row, and merges that take dropped tokens into real slots.
    """
    keep, n = red.keep, red.n if n is None else n
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.int64 or keep.dim() != 2:
        got = f"{keep.dtype} of shape {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise ValueError(f"{name} must be an int64 tensor [B, K], got {got}")
    if red.n != n:
        raise ValueError(f"{name} reduces {red.n} tokens; the sequence has {n}")
    B, K = keep.shape
    if K > n or (keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= n)):
        raise ValueError(f"{name} has indices outside [0, {n}) or keeps more than {n} tokens")
    valid = red.valid if red.valid is not None else torch.ones(B, K, dtype=torch.bool, device=keep.device)
    if valid.shape != keep.shape or valid.dtype != torch.bool:
        raise ValueError(f"{name}: valid must be a bool mask of keep's shape {tuple(keep.shape)}")
    if K > 1 and bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        raise ValueError(f"{name}: the real slots of each row must come first (valid is True then False)")
    if K > 1 and not bool(((keep[:, 1:] > keep[:, :-1]) | ~valid[:, 1:]).all()):
        raise ValueError(f"{name} must be sorted ascending and unique in each row")
    if layout is not None and layout.protected:
        hit = torch.zeros(B, n, dtype=torch.bool, device=keep.device)
        hit.scatter_(1, keep, valid)
        lost = ~hit[:, list(layout.protected)]
        if bool(lost.any()):
            dropped = sorted({layout.protected[int(j)] for j in lost.nonzero()[:, 1]})
            raise ValueError(f"{name} dropped protected tokens {dropped}")
    if red.merge is not None:
        m = red.merge
        if not (m.src.shape == m.dst.shape == m.weight.shape) or m.src.dim() != 2 or m.src.shape[0] != B:
            raise ValueError(f"{name}: merge src, dst and weight must share one [B, D] shape")
        if m.src.numel() and (int(m.dst.min()) < 0 or int(m.dst.max()) >= K or int(m.src.min()) < 0
                              or int(m.src.max()) >= n):
            raise ValueError(f"{name}: merge indices out of range")
        if not bool(torch.isfinite(m.weight).all()) or bool((m.weight < 0).any()):
            raise ValueError(f"{name}: merge weights must be finite and >= 0")
        kept = torch.zeros(B, n, dtype=torch.bool, device=keep.device).scatter_(1, keep, valid)
        if bool((kept.gather(1, m.src) & (m.weight > 0)).any()):
            raise ValueError(f"{name}: a merged token is also kept")
