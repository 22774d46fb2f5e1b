"""Plain float32 PyTorch reference for :func:`prunelab.kernels.attention_received.attention_received`.

It materialises the full ``[B, H, Nq, Nk]`` probability matrix, so it is the readable definition of the op
and the oracle the Triton kernel is tested against, not a fast path.
"""

from __future__ import annotations

import math

import torch


def attention_received_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    query_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output plus the (weighted) attention mass each key receives, in float32.

    ``P = softmax(q @ k^T * scale)`` over keys; ``out = P @ v``;
    ``received[b, h, j] = sum_i w[b, h, i] * P[b, h, i, j]``.

    Args:
        q: Queries, shape ``[B, H, Nq, D]``.
        k: Keys, shape ``[B, H, Nk, D]``.
        v: Values, shape ``[B, H, Nk, D]``.
        scale: Multiplier on the logits; ``None`` means ``1 / sqrt(D)``.
        query_weights: Per-query weights ``w``, shape ``[B, Nq]`` (shared by all heads) or ``[B, H, Nq]``;
            ``None`` means all ones (plain column sum of ``P``).

    Returns:
        ``(out, received)``: ``out`` of shape ``[B, H, Nq, D]`` in ``q.dtype``; ``received`` of shape
        ``[B, H, Nk]`` in float32.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    qf, kf, vf = q.float(), k.float(), v.float()
    logits = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, H, Nq, Nk]
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs, vf).to(q.dtype)
    if query_weights is None:
        received = probs.sum(dim=-2)
    else:
        w = query_weights.float()
        if w.dim() == 2:  # [B, Nq] -> [B, 1, Nq], broadcast over heads
            w = w.unsqueeze(1)
        received = torch.einsum("bhi,bhij->bhj", w.expand(q.shape[0], q.shape[1], -1), probs)
    return out, received
