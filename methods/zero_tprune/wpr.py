"""Zero-TPrune's tensor functions: Weighted PageRank, head aggregation (VHF + EIR) and the S-stage.

Pure functions of tensors; they know no model. Names follow the paper (Wang, Dedhia, Jha, CVPR 2024,
arXiv 2305.17328); the method README maps each to the paper and lists the open points.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from prunelab.common.tokens import gather_tokens


def initial_distribution(n: int, class_positions: tuple[int, ...], batch: int, *, cls_boost: bool = True,
                         device=None, dtype=torch.float32) -> torch.Tensor:
    """WPR start vector s^0 [B, N].

    Class tokens (CLS, distillation) start at sqrt(N) times the weight of every other token ("Zero-TPrune");
    ``cls_boost=False`` gives the uniform start of "Zero-TPrune-uni". The vector sums to 1.
    """
    s0 = torch.ones(batch, n, device=device, dtype=dtype)
    if cls_boost and class_positions:
        s0[:, list(class_positions)] = math.sqrt(n)
    return s0 / s0.sum(dim=-1, keepdim=True)


def wpr_scores(attn: torch.Tensor, s0: torch.Tensor, iters: int,
               row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted PageRank on each head's attention graph: ``iters`` steps of s <- A^T s (Algorithm 1).

    Token j gives weight A[j, i] to token i, so s_i <- sum_j A[j, i] s_j. No damping: A is
    row-stochastic, so the total mass stays 1 and many iterations reach A's left Perron vector.

    Args:
        attn: [B, H, N, N] attention probabilities, rows summing to 1.
        s0: [B, N] (shared by all heads) or [B, H, N] start distribution.
        iters: number of power iterations (>= 1).
        row_scale: [B, H, N] factors applied to the rows of ``attn`` (``1 / row sums`` re-normalises a
            restricted graph): iterating with ``s * row_scale`` equals iterating on the scaled matrix
            without materialising it.

    Returns:
        [B, H, N] importance distribution per head (sums to 1 over N).
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    s = (s0 if s0.dim() == 3 else s0[:, None, :].expand(-1, attn.shape[1], -1)).to(attn.dtype)
    s = s.unsqueeze(-2)  # [B, H, 1, N]: a row vector, so s @ A = (A^T s)^T
    scale = None if row_scale is None else row_scale.unsqueeze(-2).to(attn.dtype)
    for _ in range(iters):
        s = (s if scale is None else s * scale) @ attn
    return s.squeeze(-2)


def variance_head_filter(scores: torch.Tensor, band: tuple[float, float]) -> torch.Tensor:
    """VHF (variance-based head filter): heads whose score variance lies inside ``band`` -> [B, H] bool.

    The variance is taken of N * s (scores rescaled to mean 1): on the sum-to-1 scale it is at most
    (N - 1) / N^2, below the paper's 0.01 floor for any ViT, so the paper's band must refer to a
    rescaled distribution. The scale is an open point; see the README.
    """
    n = scores.shape[-1]
    var = (scores * n).var(dim=-1, unbiased=False)
    return (var >= band[0]) & (var <= band[1])


def emphasize_informative_region(scores: torch.Tensor, head_mask: torch.Tensor | None = None) -> torch.Tensor:
    """EIR (emphasise informative region): combine heads by root mean square over the kept heads -> [B, N].

    Args:
        scores: [B, H, N] per-head importance.
        head_mask: [B, H] heads to use (VHF); a sample whose heads are all filtered uses every head.
    """
    if head_mask is None:
        return scores.square().mean(dim=1).sqrt()
    none_kept = ~head_mask.any(dim=1, keepdim=True)
    mask = (head_mask | none_kept).to(scores.dtype)  # deterministic fallback: all heads
    return ((scores.square() * mask[..., None]).sum(dim=1) / mask.sum(dim=1)[:, None]).sqrt()


def aggregate_heads(scores: torch.Tensor, band: tuple[float, float] | None) -> torch.Tensor:
    """VHF then EIR; ``band=None`` skips the filter."""
    return emphasize_informative_region(scores, None if band is None else variance_head_filter(scores, band))


def restrict_attention(attn: torch.Tensor, keep: torch.Tensor, renormalize: bool = True) -> torch.Tensor:
    """The attention graph among the kept tokens: A[keep][:, keep] -> [B, H, K, K].

    Rows are renormalised to sum to 1 so WPR on the subgraph stays a Markov chain (an open point of the
    paper; ``renormalize=False`` keeps the raw sub-matrix). The method itself passes ``1 / row sums`` to
    :func:`wpr_scores` as ``row_scale`` instead, which is the same graph without a pass over the matrix.
    """
    b, h, n, _ = attn.shape
    k = keep.shape[1]
    flat = (keep[:, :, None] * n + keep[:, None, :]).reshape(b, 1, k * k)  # one gather of the K x K block
    sub = torch.gather(attn.reshape(b, h, n * n), 2, flat.expand(b, h, -1)).reshape(b, h, k, k)
    return sub / sub.sum(dim=-1, keepdim=True) if renormalize else sub


def sequential_u_partition(importance: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential-U partition: sort patch tokens by importance; the less important half is A.

    Args:
        importance: [B, N] scores; the first ``num_prefix`` tokens are protected and in neither group.

    Returns:
        ``(group_a, group_b)`` token indices [B, floor(P/2)] and [B, P - floor(P/2)], P = patch tokens.
    """
    patch = importance[:, num_prefix:]
    order = torch.sort(patch, dim=-1, stable=True).indices + num_prefix  # ascending importance
    half = patch.shape[1] // 2
    return order[:, :half], order[:, half:]


def similarity_prune(keys: torch.Tensor, importance: torch.Tensor, r_s: int, num_prefix: int) -> torch.Tensor:
    """S-stage: drop the ``r_s`` tokens of group A most similar to some token of group B.

    Similarity is the cosine of the keys with the heads concatenated (an open point; see the README).
    Tokens are dropped, not merged.

    Args:
        keys: [B, H, N, Dh] keys of the pruning layer.
        importance: [B, N] I'-stage scores that define the partition.
        r_s: tokens to remove; at most the size of group A.
        num_prefix: protected leading tokens.

    Returns:
        [B, N - r_s] kept indices, sorted.
    """
    b, h, n, dh = keys.shape
    if r_s == 0:
        return torch.arange(n, device=keys.device).expand(b, -1)
    group_a, group_b = sequential_u_partition(importance, num_prefix)
    if r_s > group_a.shape[1]:
        raise ValueError(f"r_s={r_s} exceeds the {group_a.shape[1]} tokens of group A")
    k = F.normalize(keys.transpose(1, 2).reshape(b, n, h * dh), dim=-1)
    ka, kb = gather_tokens(k, group_a), gather_tokens(k, group_b)
    best = (ka @ kb.transpose(1, 2)).amax(dim=-1)  # [B, |A|]: m_a = max_b cos(k_a, k_b)
    drop = torch.gather(group_a, 1, torch.sort(best, dim=-1, descending=True, stable=True).indices[:, :r_s])
    keep_mask = torch.ones(b, n, dtype=torch.bool, device=keys.device)
    keep_mask.scatter_(1, drop, False)
    return keep_mask.nonzero()[:, 1].reshape(b, n - r_s)
