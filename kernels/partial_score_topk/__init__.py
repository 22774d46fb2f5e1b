"""Partial-dim scores over the KV cache and the top-N positions per head (FASA's token-importance prediction).

*FASA: Frequency-aware Sparse Attention* (Wang et al., ICLR 2026, arXiv 2602.03152) replaces decode-time
attention in layers >= 1 by two steps. This op is the first: every query head scores every cached key with
a dot product restricted to its "dominant" dims ``D`` (the union of a few RoPE frequency chunks; in the
transformers ``rotate_half`` layout chunk ``j`` is dims ``{j, j + d/2}``), with no softmax and no scaling,
and keeps the ``N`` best positions. :func:`prunelab.kernels.sparse_decode_attention.sparse_decode_attention`
then attends exactly over just those keys. With all ``d`` dims the scores are the full logits and the
selection is the oracle top-N; with a budget ``>= T`` every position is kept and the pair equals dense
decode attention.

Grouped-query attention: query head ``h`` reads kv head ``h // (Hq // Hkv)``; selection is per query head.

The Triton path writes fp32 scores to a scratch buffer, then selects exactly (radix select) and emits the
positions already sorted ascending; see :mod:`.triton` for the supported sizes. Use
:func:`partial_score_topk` (dispatch) rather than the implementations directly.
"""

from __future__ import annotations

import torch

from prunelab.kernels.dispatch import check_decode_qk, check_impl, resolve_impl

from .reference import partial_score_topk_ref, partial_scores_ref

__all__ = ["partial_score_topk", "partial_score_topk_ref", "partial_scores_ref"]




def _validate(q, k_cache, dims, budget, lengths, impl) -> None:
    check_impl(impl)
    check_decode_qk(q, k_cache)
    B, hq, d = q.shape
    T = k_cache.shape[2]
    if not isinstance(dims, torch.Tensor) or dims.dtype != torch.int64:
        raise ValueError(f"dims: expected an int64 torch.Tensor, got {getattr(dims, 'dtype', type(dims).__name__)}")
    if dims.dim() != 2 or dims.shape[0] != hq or dims.shape[1] == 0:
        raise ValueError(f"dims: expected shape [Hq, m] with Hq={hq} and m >= 1, got {tuple(dims.shape)}")
    if dims.device != q.device:
        raise ValueError(f"dims: device must match q ({q.device}), got {dims.device}")
    if dims.min().item() < 0 or dims.max().item() >= d:
        raise ValueError(f"dims: entries must lie in [0, d-1] = [0, {d - 1}], got range "
                         f"[{dims.min().item()}, {dims.max().item()}]")
    if (dims.sort(dim=1).values.diff(dim=1) == 0).any().item():
        raise ValueError("dims: the dims of a head must be distinct (a repeated dim would be counted twice)")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget: expected an int >= 1 (turn a fractional budget into floor(b * T) first), "
                         f"got {budget!r}")
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor) or lengths.dtype != torch.int64 or tuple(lengths.shape) != (B,):
            raise ValueError(f"lengths: expected an int64 tensor of shape [B]=[{B}], got "
                             f"{getattr(lengths, 'dtype', type(lengths).__name__)} "
                             f"{tuple(getattr(lengths, 'shape', ()))}")
        if lengths.device != q.device:
            raise ValueError(f"lengths: device must match q ({q.device}), got {lengths.device}")
        if lengths.min().item() < 1 or lengths.max().item() > T:
            raise ValueError(f"lengths: entries must lie in [1, T] = [1, {T}], got {lengths.tolist()}")


def partial_score_topk(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    dims: torch.Tensor,
    budget: int,
    *,
    lengths: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Positions of the ``budget`` cached keys with the largest partial-dim score, per query head.

    ``s[b, h, t] = sum_i q[b, h, dims[h, i]] * k_cache[b, h // group, t, dims[h, i]]`` (fp32, unscaled,
    ``group = Hq // Hkv``). With ``N_b = min(budget, lengths[b])``, row ``[b, h]`` of the result holds the
    ``N_b`` valid positions (``t < lengths[b]``) with the largest scores, ties broken towards the lower
    position, sorted ascending and unique; its last ``budget - N_b`` slots hold ``-1``.

    Args:
        q: Decode queries (one per sequence), shape ``[B, Hq, d]``, float32/float16/bfloat16.
        k_cache: Cached keys, shape ``[B, Hkv, T, d]`` with ``Hkv`` dividing ``Hq``, same dtype and device.
        dims: Dominant dims per query head, int64 ``[Hq, m]``, distinct entries in ``[0, d-1]`` (the same
            ``m`` for every head). ``dims[h] = arange(d)`` gives the full logits.
        budget: Positions to keep per head, ``N >= 1``; may exceed ``T``.
        lengths: Valid cache length per sequence, int64 ``[B]`` in ``[1, T]``; positions ``>= lengths[b]`` are
            padding and never selected. ``None`` means ``T`` for every sequence.
        impl: ``"torch"`` (float32 reference), ``"triton"`` (two kernels; CPU tensors need
            ``TRITON_INTERPRET=1``), or ``"auto"`` (Triton on CUDA when available, else torch).

    Returns:
        int64 ``[B, Hq, budget]``: kept positions sorted ascending, then ``-1`` padding.

    Raises:
        ValueError: bad ``impl``, shapes, dtypes, devices, dims, budget or lengths (the message names the
            parameter).
        RuntimeError: ``impl="triton"`` but Triton is missing or cannot run on these tensors.
    """
    _validate(q, k_cache, dims, budget, lengths, impl)
    if resolve_impl(impl, q) == "torch":
        return partial_score_topk_ref(q, k_cache, dims, budget, lengths=lengths)
    from .triton import partial_score_topk_triton

    return partial_score_topk_triton(q, k_cache, dims, budget, lengths=lengths)
