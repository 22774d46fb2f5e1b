"""Attention that each image token receives from the image's own queries, at one decoder layer at prefill.

This is the LLM-stage importance score of VisionDrop ("Rethinking Visual Token Reduction in LVLMs under
Cross-modal Misalignment", arXiv 2506.22283): inside the language model, a visual token matters as much as
the other visual tokens attend to it. For each sample the image occupies one contiguous row range
``[start, end)``; the score of image token ``j`` is the softmax probability of ``j`` averaged over all query
heads and all image queries, where each image query's softmax runs over every key it can see (system prompt
and earlier text included, padding excluded), and only the image columns are returned.

Done naively this builds an ``[Hq, n_I, S]`` probability block per sample (on LLaVA-NeXT ``n_I`` is about
2,880 and ``S`` a few thousand, i.e. over a gigabyte in float32 for 32 heads) to keep a ``[n_I]`` vector. The
Triton path never forms it: a flash-style pass computes each image query's log-sum-exp over its visible
keys, and a second pass recomputes the probabilities of the image columns only, tile by tile, reducing over
queries on the fly.

Use :func:`image_query_received` (dispatch) rather than the implementations directly.
"""

from __future__ import annotations

import torch

from prunelab.kernels.dispatch import DTYPES, check_impl, resolve_impl

from .reference import image_query_received_ref

__all__ = ["image_query_received", "image_query_received_ref"]


def _validate(q, k, valid, start, end, impl) -> None:
    check_impl(impl)
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected shape {'[B, Hq, S, d]' if name == 'q' else '[B, Hkv, S, d]'}, "
                             f"got {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name}: dtype must be one of float32/float16/bfloat16, got {t.dtype}")
        if 0 in t.shape:
            raise ValueError(f"{name}: all sizes must be >= 1, got shape {tuple(t.shape)}")
    B, hq, S, d = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, S, d):
        raise ValueError(f"k: B, S, d must match q {(B, S, d)}, got shape {tuple(k.shape)}")
    if hq % k.shape[1]:
        raise ValueError(f"k: its Hkv={k.shape[1]} heads must divide q's Hq={hq} heads (grouped-query attention)")
    if k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"k: dtype/device must match q ({q.dtype}, {q.device}), got ({k.dtype}, {k.device})")
    if not isinstance(valid, torch.Tensor):
        raise ValueError(f"valid: expected a bool torch.Tensor, got {type(valid).__name__}")
    if valid.dtype != torch.bool or tuple(valid.shape) != (B, S):
        raise ValueError(f"valid: expected a bool tensor of shape [B, S]={[B, S]}, got {valid.dtype} "
                         f"{list(valid.shape)}")
    if valid.device != q.device:
        raise ValueError(f"valid: device must match q ({q.device}), got {valid.device}")
    for name, t in (("start", start), ("end", end)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected an int64 torch.Tensor of shape [B], got {type(t).__name__}")
        if t.dtype not in (torch.int64, torch.int32) or tuple(t.shape) != (B,):
            raise ValueError(f"{name}: expected an int64 (or int32) tensor of shape [B]={[B]}, got {t.dtype} "
                             f"{list(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name}: device must match q ({q.device}), got {t.device}")
    # one host sync for every value check
    cols = torch.arange(S, device=q.device)
    span = (cols[None, :] >= start[:, None]) & (cols[None, :] < end[:, None])
    stats = torch.stack([start.amin().long(), start.amax().long(), end.amax().long(),
                         (end - start).amin().long(), (span & ~valid).any().long()]).tolist()
    if stats[0] < 0 or stats[1] >= S:
        raise ValueError(f"start: every entry must lie in [0, S={S}), got {start.tolist()}")
    if stats[2] > S:
        raise ValueError(f"end: every entry must be <= S={S}, got {end.tolist()}")
    if stats[3] <= 0:
        raise ValueError(f"end: must be > start in every sample (a non-empty image span), got start="
                         f"{start.tolist()}, end={end.tolist()}")
    if stats[4]:
        raise ValueError("valid: every row of the image span [start, end) must be valid (True)")


def image_query_received(
    q: torch.Tensor,
    k: torch.Tensor,
    valid: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    impl: str = "auto",
) -> torch.Tensor:
    """VisionDrop's LLM-stage score (arXiv 2506.22283): image-to-image attention received, head and query mean.

    ``score[b, j - start_b] = mean_h mean_{start_b <= i < end_b} P[b, h, i, j]`` for ``start_b <= j < end_b``,
    where ``P[b, h, i] = softmax_j(q[b, h, i] . k[b, h // (Hq / Hkv), j] * scale)`` over the keys query ``i``
    sees: valid ones, and with ``causal`` only ``j <= i``. The denominator therefore includes the non-image
    keys (system prompt, text before the image, and with ``causal=False`` also text after it).

    Args:
        q: Post-RoPE queries of one layer at prefill, shape ``[B, Hq, S, d]``, float32/float16/bfloat16.
        k: Post-RoPE keys, shape ``[B, Hkv, S, d]``, same dtype and device as ``q``; ``Hq % Hkv == 0``.
        valid: Bool ``[B, S]``; False marks padded keys (excluded from every softmax). The image rows must
            all be valid.
        start: Int64 ``[B]``, first image row per sample, in ``[0, S)``.
        end: Int64 ``[B]``, one past the last image row per sample, ``start < end <= S``.
        scale: Logit multiplier; ``None`` means ``1 / sqrt(d)``.
        causal: The decoder's causal mask (default); False is a bidirectional ablation.
        impl: ``"torch"`` (float32 reference), ``"triton"`` (two fused passes; CPU tensors need
            ``TRITON_INTERPRET=1``), or ``"auto"`` (Triton on CUDA when available, else torch).

    Returns:
        Float32 ``[B, n_max]``, ``n_max = max(end - start)``; positions past a sample's span length are 0.

    Raises:
        ValueError: bad ``impl``, shapes, dtypes, devices or spans (the message names the parameter).
        RuntimeError: ``impl="triton"`` but Triton is missing or cannot run on these tensors.
    """
    _validate(q, k, valid, start, end, impl)
    start, end = start.long(), end.long()
    if resolve_impl(impl, q) == "torch":
        return image_query_received_ref(q, k, valid, start, end, scale=scale, causal=causal)
    from .triton import image_query_received_triton

    return image_query_received_triton(q, k, valid, start, end, scale=scale, causal=causal)
