"""Plain float32 PyTorch reference for :func:`prunelab.kernels.partial_score_topk.partial_score_topk`.

It materialises the gathered key dimensions of every query head (``[Hq, m, B, T]``) and sorts every score
row, so it is the readable definition of the op and the oracle the Triton kernels are tested against, not a
fast path.
"""

from __future__ import annotations

import torch


def partial_scores_ref(q: torch.Tensor, k_cache: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """FASA token-importance scores: partial dot products over each query head's dominant dims, in float32.

    ``s[b, h, t] = sum_i q[b, h, dims[h, i]] * k_cache[b, h // group, t, dims[h, i]]`` with
    ``group = Hq // Hkv``; no softmax and no ``1 / sqrt(d)`` scaling.

    Args:
        q: Decode queries, shape ``[B, Hq, d]``.
        k_cache: Cached keys, shape ``[B, Hkv, T, d]``.
        dims: Dominant dimension indices per query head, int64 ``[Hq, m]``.

    Returns:
        Scores, float32 ``[B, Hq, T]`` (every position, padding included).
    """
    hq, hkv = q.shape[1], k_cache.shape[1]
    kv_head = torch.arange(hq, device=q.device) // (hq // hkv)  # [Hq]
    q_dom = torch.gather(q.float(), 2, dims.unsqueeze(0).expand(q.shape[0], -1, -1))  # [B, Hq, m]
    # Two index tensors separated by a slice: the broadcast index dims [Hq, m] come first -> [Hq, m, B, T].
    k_dom = k_cache[:, kv_head[:, None], :, dims].float()
    return torch.einsum("bhm,hmbt->bht", q_dom, k_dom)


def partial_score_topk_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    dims: torch.Tensor,
    budget: int,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of the top-``budget`` cached positions per query head by partial score, sorted ascending.

    For sequence ``b`` with ``N_b = min(budget, lengths[b])``, row ``[b, h]`` holds the ``N_b`` valid
    positions (``t < lengths[b]``) with the largest :func:`partial_scores_ref`, ties broken towards the lower
    position, sorted ascending; the remaining ``budget - N_b`` slots hold ``-1``.

    Args:
        q: Decode queries, shape ``[B, Hq, d]``.
        k_cache: Cached keys, shape ``[B, Hkv, T, d]``.
        dims: Dominant dimension indices per query head, int64 ``[Hq, m]``.
        budget: Number of positions to keep, ``N >= 1``.
        lengths: Valid cache length per sequence, int64 ``[B]``; ``None`` means ``T`` for all.

    Returns:
        int64 ``[B, Hq, budget]``.
    """
    B, hq = q.shape[:2]
    T = k_cache.shape[2]
    pos = torch.arange(T, device=q.device)
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.int64, device=q.device)
    scores = partial_scores_ref(q, k_cache, dims)
    scores = scores.masked_fill(pos >= lengths[:, None, None], float("-inf"))
    # Stable descending sort keeps equal scores in position order, so ties go to the lower position. Padding
    # (-inf) sits at positions >= every valid one, so it sorts after any valid -inf as well.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :budget]
    if order.shape[-1] < budget:  # budget > T: pad, the padding is dropped below
        order = torch.cat([order, order.new_full((B, hq, budget - T), T)], dim=-1)
    n_keep = torch.clamp(lengths, max=budget)  # N_b
    slot = torch.arange(budget, device=q.device)
    kept = torch.where(slot < n_keep[:, None, None], order, T)  # dropped slots -> T, sorted to the end
    kept = torch.sort(kept, dim=-1).values
    return torch.where(kept < T, kept, -1)
