"""Decode attention over a per-head subset of the KV cache (indexed flash-decoding).

*FASA: Frequency-aware Sparse Attention* (Wang et al., ICLR 2026, arXiv 2602.03152) replaces decode-time
attention in layers >= 1 by two steps: :func:`prunelab.kernels.partial_score_topk.partial_score_topk` picks
the top-N cached positions per query head from partial-dim scores, and this op, the "focused attention", runs
exact attention (full head dim, softmax with ``1 / sqrt(d)``) of the decode query over just those keys and
values. It reads ``2 * N * d`` elements per query head instead of ``2 * T * d`` per kv head, which is where
FASA's decode speed-up comes from. With every position selected (a budget ``>= T`` and all dims) it equals
dense decode attention. Any selection works (FASA, Quest, oracle top-k, a sink + window), as long as each
row names at least one position.

Grouped-query attention: query head ``h`` reads kv head ``h // (Hq // Hkv)``; each query head has its own
index list.

The Triton path gathers K/V rows by index inside the kernel with an online softmax, so the gathered
``[B, Hq, N, d]`` K/V are never written to memory. Use :func:`sparse_decode_attention` (dispatch) rather
than the implementations directly.
"""

from __future__ import annotations

import torch

from prunelab.kernels.dispatch import check_decode_qk, check_impl, resolve_impl

from .reference import sparse_decode_attention_ref

__all__ = ["sparse_decode_attention", "sparse_decode_attention_ref"]




def _validate(q, k_cache, v_cache, indices, scale, impl) -> None:
    check_impl(impl)
    check_decode_qk(q, k_cache)
    B, hq, _ = q.shape
    if not isinstance(v_cache, torch.Tensor) or v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: expected a tensor shaped like k_cache {tuple(k_cache.shape)}, got "
                         f"{tuple(getattr(v_cache, 'shape', ())) or type(v_cache).__name__}")
    if v_cache.dtype != q.dtype or v_cache.device != q.device:
        raise ValueError(f"v_cache: dtype/device must match q ({q.dtype}, {q.device}), got ({v_cache.dtype}, "
                         f"{v_cache.device})")
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64:
        raise ValueError(f"indices: expected an int64 torch.Tensor, got "
                         f"{getattr(indices, 'dtype', type(indices).__name__)}")
    if indices.dim() != 3 or tuple(indices.shape[:2]) != (B, hq) or indices.shape[2] == 0:
        raise ValueError(f"indices: expected shape [B, Hq, N] with (B, Hq)={(B, hq)} and N >= 1, got "
                         f"{tuple(indices.shape)}")
    if indices.device != q.device:
        raise ValueError(f"indices: device must match q ({q.device}), got {indices.device}")
    T = k_cache.shape[2]
    if indices.min().item() < -1 or indices.max().item() >= T:
        raise ValueError(f"indices: entries must be -1 (padding) or positions in [0, T-1] = [0, {T - 1}], got "
                         f"range [{indices.min().item()}, {indices.max().item()}]")
    empty = ~(indices >= 0).any(dim=-1)
    if empty.any().item():
        b, h = empty.nonzero()[0].tolist()
        raise ValueError(f"indices: every (batch, head) row needs at least one valid position (softmax over "
                         f"nothing), but {int(empty.sum())} rows have none, e.g. [b={b}, h={h}]; check lengths")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"scale: expected a float or None, got {scale!r}")


def sparse_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    indices: torch.Tensor,
    *,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Softmax attention of each decode query head over its own selected cached positions.

    ``out[b, h] = softmax_i(q[b, h] . K[idx_i] * scale) @ V[idx_i]`` over the entries
    ``idx_i = indices[b, h, i] >= 0``, with ``K, V = k_cache[b, h // group], v_cache[b, h // group]`` and
    ``group = Hq // Hkv``. A repeated index is counted as often as it appears.

    Args:
        q: Decode queries (one per sequence), shape ``[B, Hq, d]``, float32/float16/bfloat16.
        k_cache: Cached keys, shape ``[B, Hkv, T, d]`` with ``Hkv`` dividing ``Hq``, same dtype and device.
        v_cache: Cached values, same shape, dtype and device as ``k_cache``.
        indices: Positions per query head, int64 ``[B, Hq, N]`` in ``[0, T-1]``, ``-1`` for padding (for
            example the output of ``partial_score_topk``). Every row needs at least one valid entry.
        scale: Logit multiplier; ``None`` means ``1 / sqrt(d)`` (as in SDPA).
        impl: ``"torch"`` (float32 reference), ``"triton"`` (fused gather + online softmax; CPU tensors
            need ``TRITON_INTERPRET=1``), or ``"auto"`` (Triton on CUDA when available, else torch).

    Returns:
        ``[B, Hq, d]`` in ``q.dtype`` (fp32 accumulation).

    Raises:
        ValueError: bad ``impl``, shapes, dtypes, devices, ``scale``, out-of-range indices or a row without
            a valid index (the message names the parameter).
        RuntimeError: ``impl="triton"`` but Triton is missing or cannot run on these tensors.
    """
    _validate(q, k_cache, v_cache, indices, scale, impl)
    if resolve_impl(impl, q) == "torch":
        return sparse_decode_attention_ref(q, k_cache, v_cache, indices, scale=scale)
    from .triton import sparse_decode_attention_triton

    return sparse_decode_attention_triton(q, k_cache, v_cache, indices, scale=scale)
