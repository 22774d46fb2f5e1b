"""Fused attention forward that also returns the attention mass each key receives.

Several token-pruning methods score a token by how much attention it *receives* from the queries:

* **Zero-TPrune** ranks tokens with Weighted PageRank on the attention graph; one power-iteration step is
  ``s <- P^T s``, i.e. ``received`` with ``query_weights = s`` (a distribution over queries).
* **HiPrune** uses column means of the attention matrix (``received / Nq`` with ``query_weights=None``).
* **VisionDrop** keeps the visual tokens with the largest received attention (column sums of ``P``).

Computing these naively materialises the ``[B, H, Nq, Nk]`` softmax just to sum it over queries. The Triton
path computes ``out`` and ``received`` without that matrix: a flash-attention pass writes ``out`` and the
per-query log-sum-exp, then a second pass recomputes ``P`` block by block and reduces it over queries.

Use :func:`attention_received` (dispatch) rather than the implementations directly.
"""

from __future__ import annotations

import torch

from prunelab.kernels.dispatch import DTYPES, check_impl, resolve_impl

from .reference import attention_received_ref

__all__ = ["attention_received", "attention_received_ref"]




def _validate(q, k, v, query_weights, impl) -> None:
    check_impl(impl)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected shape [B, H, N, D], got {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name}: dtype must be one of float32/float16/bfloat16, got {t.dtype}")
        if t.shape[2] == 0 or t.shape[3] == 0:
            raise ValueError(f"{name}: N and D must be >= 1, got shape {tuple(t.shape)}")
    B, H, _, D = q.shape
    for name, t in (("k", k), ("v", v)):
        if (t.shape[0], t.shape[1], t.shape[3]) != (B, H, D):
            raise ValueError(f"{name}: B, H, D must match q {(B, H, D)}, got shape {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name}: dtype/device must match q ({q.dtype}, {q.device}), got ({t.dtype}, "
                             f"{t.device})")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"v: must have as many keys as k ({k.shape[2]}), got shape {tuple(v.shape)}")
    if query_weights is not None:
        nq = q.shape[2]
        if not isinstance(query_weights, torch.Tensor):
            raise ValueError("query_weights: expected a torch.Tensor or None")
        if tuple(query_weights.shape) not in ((B, nq), (B, H, nq)):
            raise ValueError(f"query_weights: expected shape [B, Nq]={[B, nq]} or [B, H, Nq]={[B, H, nq]}, "
                             f"got {list(query_weights.shape)}")
        if query_weights.device != q.device:
            raise ValueError(f"query_weights: device must match q ({q.device}), got {query_weights.device}")


def attention_received(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    query_weights: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention output plus the (weighted) attention each key receives.

    With ``P = softmax(q @ k^T * scale)`` over keys: ``out = P @ v`` and
    ``received[b, h, j] = sum_i w[b, h, i] * P[b, h, i, j]`` (``w`` = ``query_weights``, or ones).

    Args:
        q: Queries, shape ``[B, H, Nq, D]``, float32/float16/bfloat16.
        k: Keys, shape ``[B, H, Nk, D]``, same dtype and device as ``q``.
        v: Values, shape ``[B, H, Nk, D]``, same dtype and device as ``q``.
        scale: Logit multiplier; ``None`` means ``1 / sqrt(D)`` (as in SDPA).
        query_weights: Optional per-query weights, shape ``[B, Nq]`` (shared by heads) or ``[B, H, Nq]``.
            ``None`` gives plain column sums of ``P``; a distribution over queries gives one
            Weighted-PageRank step ``P^T s``.
        impl: ``"torch"`` (float32 reference), ``"triton"`` (fused kernels; CPU tensors need
            ``TRITON_INTERPRET=1``), or ``"auto"`` (Triton on CUDA when available, else torch).

    Returns:
        ``(out, received)``: ``out`` has shape ``[B, H, Nq, D]`` and dtype ``q.dtype``; ``received`` has
        shape ``[B, H, Nk]`` and dtype float32.

    Raises:
        ValueError: bad ``impl``, shapes, dtypes or devices (the message names the parameter).
        RuntimeError: ``impl="triton"`` but Triton is missing or cannot run on these tensors.
    """
    _validate(q, k, v, query_weights, impl)
    if resolve_impl(impl, q) == "torch":
        return attention_received_ref(q, k, v, scale=scale, query_weights=query_weights)
    from .triton import attention_received_triton

    w = None if query_weights is None else query_weights.to(torch.float32)
    return attention_received_triton(q, k, v, scale=scale, query_weights=w)
