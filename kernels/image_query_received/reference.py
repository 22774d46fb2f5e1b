"""Plain float32 PyTorch reference for :func:`prunelab.kernels.image_query_received.image_query_received`.

It forms the probability block ``[Hq, chunk, S]`` of a chunk of image queries over all keys explicitly, so it
is the readable definition of the op and the oracle the Triton kernels are tested against, not a fast path.
Chunking over queries bounds its memory at ``Hq * chunk_size * S`` floats per step.
"""

from __future__ import annotations

import math

import torch


def image_query_received_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    valid: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    scale: float | None = None,
    causal: bool = True,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Mean attention that each image token receives from the image queries, in float32.

    The LLM-stage score of VisionDrop ("Rethinking Visual Token Reduction in LVLMs under Cross-modal
    Misalignment", arXiv 2506.22283): for sample ``b`` with image rows ``[start_b, end_b)``,
    ``score[b, j - start_b] = mean_h mean_{i in image} P[b, h, i, j]`` for ``j`` in the image span, where
    ``P[b, h, i] = softmax_j(q[b, h, i] . k[b, h // (Hq / Hkv), j] * scale)`` over the valid keys ``j`` (and
    ``j <= i`` when ``causal``). The softmax runs over all visible keys, image or not; only the image columns
    are kept.

    Args:
        q: Post-RoPE queries, shape ``[B, Hq, S, d]``.
        k: Post-RoPE keys, shape ``[B, Hkv, S, d]``, ``Hq`` a multiple of ``Hkv`` (grouped-query attention).
        valid: Bool ``[B, S]``, False on padded keys.
        start: Int ``[B]``, first image row of each sample.
        end: Int ``[B]``, one past the last image row of each sample.
        scale: Multiplier on the logits; ``None`` means ``1 / sqrt(d)``.
        causal: Query ``i`` sees only keys ``j <= i`` (the decoder's mask); False lets it see every valid key.
        chunk_size: Image queries per step; bounds the block held in memory.

    Returns:
        Float32 ``[B, n_max]`` with ``n_max = max(end - start)``; entries past a sample's span length are 0.
    """
    B, hq, S, d = q.shape
    group = hq // k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    starts, ends = start.tolist(), end.tolist()
    n_max = max(e - s for s, e in zip(starts, ends))
    score = torch.zeros(B, n_max, dtype=torch.float32, device=q.device)
    cols = torch.arange(S, device=q.device)
    for b in range(B):
        s0, e0 = starts[b], ends[b]
        kb = k[b].float().repeat_interleave(group, dim=0)  # [Hq, S, d]: key head of each query head
        total = torch.zeros(e0 - s0, dtype=torch.float32, device=q.device)
        for i0 in range(s0, e0, chunk_size):
            i1 = min(i0 + chunk_size, e0)
            logits = torch.einsum("hid,hjd->hij", q[b, :, i0:i1].float(), kb) * scale  # [Hq, c, S]
            visible = valid[b][None, :].expand(i1 - i0, S)
            if causal:
                rows = torch.arange(i0, i1, device=q.device)
                visible = visible & (cols[None, :] <= rows[:, None])
            probs = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
            total += probs[:, :, s0:e0].sum(dim=(0, 1))
        score[b, : e0 - s0] = total / (hq * (e0 - s0))
    return score
