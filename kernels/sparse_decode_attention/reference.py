"""Plain float32 PyTorch reference for :func:`prunelab.kernels.sparse_decode_attention.sparse_decode_attention`.

It gathers the selected K and V rows into ``[B, Hq, N, d]`` tensors and runs a masked softmax, so it is the
readable definition of the op and the oracle the Triton kernel is tested against, not a fast path.
"""

from __future__ import annotations

import math

import torch


def sparse_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    indices: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Decode attention of each query head over its own subset of cached positions, in float32.

    ``out[b, h] = softmax_i(q[b, h] . K[idx_i] * scale) @ V[idx_i]`` over the entries ``idx_i = indices[b, h,
    i] >= 0`` (``-1`` is padding), with ``K = k_cache[b, h // group]`` and ``V = v_cache[b, h // group]``.

    Args:
        q: Decode queries, shape ``[B, Hq, d]``.
        k_cache: Cached keys, shape ``[B, Hkv, T, d]``.
        v_cache: Cached values, shape ``[B, Hkv, T, d]``.
        indices: Selected positions, int64 ``[B, Hq, N]``; ``-1`` entries are ignored. Every row needs one
            valid entry (a row with none gives NaN here; the public function rejects it).
        scale: Logit multiplier; ``None`` means ``1 / sqrt(d)``.

    Returns:
        ``[B, Hq, d]`` in ``q.dtype``.
    """
    B, hq, d = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    kv_head = torch.arange(hq, device=q.device) // (hq // k_cache.shape[1])
    batch = torch.arange(B, device=q.device)[:, None, None]
    safe = indices.clamp(min=0)
    k_sel = k_cache[batch, kv_head[None, :, None], safe].float()  # [B, Hq, N, d]
    v_sel = v_cache[batch, kv_head[None, :, None], safe].float()
    logits = torch.einsum("bhd,bhnd->bhn", q.float(), k_sel) * scale
    probs = torch.softmax(logits.masked_fill(indices < 0, float("-inf")), dim=-1)
    return torch.einsum("bhn,bhnd->bhd", probs, v_sel).to(q.dtype)
