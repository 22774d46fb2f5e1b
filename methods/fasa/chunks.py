"""Frequency chunks of RoPE attention and their contextual agreement with the full head (FASA, §3).

*FASA: Frequency-aware Sparse Attention* (Wang et al., ICLR 2026, arXiv 2602.03152). RoPE rotates a head of
dim ``d`` as ``d/2`` independent 2-D planes, plane ``j`` at frequency ``theta_j = base^(-2j/d)``. A *frequency
chunk* (FC) is one plane, so the post-RoPE logit is exactly the sum of ``d/2`` chunk logits, and each chunk logit
depends on the positions only through their offset.

Which dims form plane ``j`` depends on the layout. transformers' ``rotate_half`` (Llama, Qwen2/3, Mistral) pairs
dim ``j`` with ``j + d/2``: that is ``fc_layout="rope_pairs"`` (the paper's definition, our default). The official
code (``AMAP-ML/FASA-ICLR2026``) takes contiguous dims ``(2j, 2j+1)`` of the same tensors, which are not rotation
planes of this layout: ``fc_layout="official_contiguous"`` reproduces it. Calibration and inference always use
the same layout, so the official numbers are self-consistent.

These functions know no model. Shapes: ``q [..., nq, d]``, ``k [..., T, d]``.
"""

from __future__ import annotations

import torch

from prunelab.common.validate import check_choice, check_int, check_ints, check_real

__all__ = ["FC_LAYOUTS", "chunk_dims", "chunk_logits", "contextual_agreement", "dominant_chunks", "dominant_dims"]

FC_LAYOUTS = ("rope_pairs", "official_contiguous")


def _check_layout(fc_layout: str) -> None:
    check_choice(fc_layout, "fc_layout", FC_LAYOUTS)


def chunk_dims(head_dim: int, fc_layout: str = "rope_pairs") -> torch.Tensor:
    """The two dims of each frequency chunk: int64 ``[d/2, 2]``.

    ``rope_pairs``: chunk ``j`` is ``(j, j + d/2)`` (a true rotation plane of ``rotate_half``).
    ``official_contiguous``: chunk ``j`` is ``(2j, 2j + 1)``.
    """
    _check_layout(fc_layout)
    head_dim = check_int(head_dim, "head_dim", low=2)
    if head_dim % 2:
        raise ValueError(f"head_dim: expected an even int >= 2, got {head_dim}")
    j = torch.arange(head_dim // 2)
    if fc_layout == "rope_pairs":
        return torch.stack([j, j + head_dim // 2], dim=1)
    return torch.stack([2 * j, 2 * j + 1], dim=1)


def chunk_logits(q: torch.Tensor, k: torch.Tensor, fc_layout: str = "rope_pairs") -> torch.Tensor:
    """Per-chunk logits ``a^(j)[q, t] = q[dims_j] . k_t[dims_j]`` in float32; their sum over ``j`` is ``q . k``.

    Args:
        q: ``[..., nq, d]`` post-RoPE queries.
        k: ``[..., T, d]`` post-RoPE keys (same leading dims as ``q``, or broadcastable).

    Returns:
        ``[..., d/2, nq, T]``.
    """
    dims = chunk_dims(q.shape[-1], fc_layout).to(q.device)
    qc = q.float()[..., dims]  # [..., nq, d/2, 2]
    kc = k.float()[..., dims]  # [..., T, d/2, 2]
    return torch.einsum("...qjc,...tjc->...jqt", qc, kc)


def contextual_agreement(full: torch.Tensor, partial: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    """``CA_K = |TopK(full) ∩ TopK(partial)| / K`` for each ``K`` in ``ks`` (FASA's contextual agreement).

    Raw logits are ranked (no softmax). Positions that must not count (future or padding) should be ``-inf`` in
    both inputs; every ``K`` must not exceed the number of finite positions in a row.

    Args:
        full: ``[..., T]`` full-head logits.
        partial: ``[..., J, T]`` logits of ``J`` candidate chunks (or any partial scorer), same leading dims.
        ks: budgets, each in ``1..T``.

    Returns:
        float32 ``[len(ks), ..., J]`` in ``[0, 1]``.
    """
    T = full.shape[-1]
    ks = check_ints(ks, "ks", low=1, high=T)
    if not ks:
        raise ValueError(f"ks: expected budgets in 1..T={T}, got none")
    k_max = max(ks)
    top_full = full.topk(k_max, dim=-1).indices  # sorted by score, so TopK is a prefix for every K
    top_part = partial.topk(k_max, dim=-1).indices
    out = []
    for k in ks:
        member = torch.zeros(full.shape, dtype=torch.bool, device=full.device)
        member.scatter_(-1, top_full[..., :k], True)
        hits = member.unsqueeze(-2).expand(partial.shape).gather(-1, top_part[..., :k])
        out.append(hits.sum(dim=-1, dtype=torch.float32) / k)
    return torch.stack(out)


def dominant_chunks(ca: torch.Tensor, n_fc: int = 16, fc_select: str = "topk", tau: float = 0.8,
                    min_fc: int | None = None) -> torch.Tensor:
    """FASA stage B: the dominant chunks of each head from its contextual-agreement profile.

    ``topk`` keeps the ``n_fc`` chunks with the highest agreement (what every official script runs:
    ``min_k = max_k = 16``). ``quantile`` keeps ``{j : c_j >= quantile_tau(c)}``, clamped to ``min_fc..n_fc``
    chunks by agreement rank (the official selector's general form). Ties go to the lower chunk index.

    Args:
        ca: ``[..., J]`` agreement per chunk (e.g. ``[L, Hq, J]``).
        n_fc: chunks kept (``topk``) or the most kept (``quantile``), ``1..J``.
        fc_select: ``"topk"`` or ``"quantile"``.
        tau: the quantile, in ``[0, 1]`` (``quantile`` only).
        min_fc: the fewest kept (``quantile`` only); defaults to ``n_fc`` as in the official scripts.

    Returns:
        bool ``[..., J]``: which chunks are dominant.
    """
    J = ca.shape[-1]
    n_fc = check_int(n_fc, "n_fc", low=1, high=J)  # J = d/2 chunks
    check_choice(fc_select, "fc_select", ("topk", "quantile"))
    # Stable rank: descending agreement, then ascending chunk id.
    order = torch.sort(ca.float(), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(J, device=ca.device).expand_as(order))
    if fc_select == "topk":
        return rank < n_fc
    tau = check_real(tau, "tau", low=0.0, high=1.0)
    min_fc = n_fc if min_fc is None else check_int(min_fc, "min_fc", low=1, high=n_fc)
    threshold = torch.quantile(ca.float(), tau, dim=-1, keepdim=True)
    count = (ca.float() >= threshold).sum(dim=-1, keepdim=True).clamp(min_fc, n_fc)
    return rank < count


def dominant_dims(chunks: torch.Tensor, fc_layout: str = "rope_pairs") -> torch.Tensor:
    """Which head dims belong to the dominant chunks: bool ``[..., d]`` from a chunk mask ``[..., d/2]``."""
    J = chunks.shape[-1]
    dims = chunk_dims(2 * J, fc_layout).to(chunks.device)  # [J, 2]
    out = torch.zeros(*chunks.shape[:-1], 2 * J, dtype=torch.bool, device=chunks.device)
    for c in range(2):  # scatter both dims of every chunk
        out.index_copy_(-1, dims[:, c], chunks)
    return out
