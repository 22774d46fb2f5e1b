"""Greedy max-min diversity selection (farthest-point / Gonzalez) on cosine distance.

*DivPrune* (Ranjbar Alvar et al., CVPR 2025) keeps the visual tokens that solve the Max-Min Diversity
Problem greedily: the first pick is the token whose nearest neighbour is farthest, and each later pick is the
unselected token farthest (in ``1 - cos``) from the chosen set. This op returns the picks *in greedy order*
together with the value each pick maximised; :func:`prunelab.methods.divprune.max_min_diversity` sorts them
into the kept-token contract.

Both paths first build the float32 distance matrix with :func:`cosine_distance_ref` (one batched matmul),
then run the ``k``-step loop: the torch reference as ``k`` rounds of vectorised ops, the Triton path as a
single launch with one program per batch element (see :mod:`.triton` for why it reads ``Dist`` rather than
recomputing distances). ``min`` and ``argmax`` are exact, so on the same distances both paths agree bit for
bit. Use :func:`max_min_diversity_order` (dispatch) rather than the implementations directly.
"""

from __future__ import annotations

import torch

from prunelab.kernels.dispatch import DTYPES, check_impl, resolve_impl

from .reference import cosine_distance_ref, first_pick_ref, greedy_max_min_ref, unit_rows

__all__ = [
    "max_min_diversity_order", "check_max_min_inputs", "cosine_distance_ref", "first_pick_ref",
    "greedy_max_min_ref", "unit_rows",
]


def check_max_min_inputs(x: torch.Tensor, k: int, valid: torch.Tensor | None, *, finite: bool = True) -> None:
    """Raise ``ValueError`` naming the bad parameter for any input :func:`max_min_diversity_order` rejects.

    ``finite=False`` skips the NaN / inf scan of ``x`` for callers that get it from :func:`unit_rows` (on the
    row norms, about 10x cheaper than ``isfinite`` over every entry at LLaVA sizes).
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x: expected shape [B, M, C], got {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x: dtype must be one of float32/float16/bfloat16, got {x.dtype}")
    if 0 in x.shape:
        raise ValueError(f"x: all sizes must be >= 1, got shape {tuple(x.shape)}")
    # a NaN would win every argmax and silently decide the selection; padding must be finite too
    if finite and not bool(torch.isfinite(x).all()):
        raise ValueError("x: contains NaN or inf")
    B, M, _ = x.shape
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k: expected an int, got {type(k).__name__}")
    if not 1 <= k <= M:
        raise ValueError(f"k: must satisfy 1 <= k <= M = {M}, got {k}")
    if valid is not None:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (B, M):
            raise ValueError(f"valid: expected a bool tensor of shape [B, M] = [{B}, {M}], got "
                             f"{getattr(valid, 'dtype', type(valid).__name__)} {tuple(getattr(valid, 'shape', ()))}")
        if valid.device != x.device:
            raise ValueError(f"valid: device must match x ({x.device}), got {valid.device}")
        counts = valid.sum(dim=-1)
        if int(counts.min()) < k:
            b = int(counts.argmin())
            raise ValueError(f"k: {k} exceeds the {int(counts[b])} valid tokens of batch row {b}")


def max_min_diversity_order(
    x: torch.Tensor,
    k: int,
    *,
    valid: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy max-min diversity picks on cosine distance, in pick order.

    ``Dist = 1 - cos`` (float32). ``s_0 = argmax_j min_{i != j} Dist[i, j]``, then
    ``s_t = argmax_{j not in S} min_{s in S} Dist[s, j]``; only valid tokens take part, ties go to the lower
    index, and no token is picked twice.

    Args:
        x: Tokens, shape ``[B, M, C]``, float32/float16/bfloat16, finite (padding included).
        k: Tokens to pick per batch element, ``1 <= k <= M`` and at most each row's valid count.
        valid: Optional bool mask ``[B, M]`` for ragged batches; invalid tokens are never picked and are
            nobody's nearest neighbour.
        impl: ``"torch"`` (reference), ``"triton"`` (single-launch kernel; CPU tensors need
            ``TRITON_INTERPRET=1``), or ``"auto"`` (Triton on CUDA when available and ``M`` fits, else torch).

    Returns:
        ``(order, score)``: ``order [B, k]`` int64 picks in greedy order; ``score [B, k]`` float32, the
        nearest-neighbour distance of the first pick, then the min-distance to the chosen set that each
        later pick maximised (non-increasing after step 1).

    Raises:
        ValueError: bad ``x``, ``k``, ``valid`` or ``impl`` (the message names the parameter).
        RuntimeError: ``impl="triton"`` but Triton is missing or cannot run on these tensors.
    """
    check_impl(impl)
    check_max_min_inputs(x, k, valid, finite=False)
    which = resolve_impl(impl, x)
    dist = cosine_distance_ref(x)  # raises on NaN / inf in x
    if which == "torch":
        return greedy_max_min_ref(dist, k, valid)
    from .triton import MAX_M, greedy_max_min_triton

    if impl == "auto" and x.shape[1] > MAX_M:
        return greedy_max_min_ref(dist, k, valid)
    return greedy_max_min_triton(dist, k, valid)
