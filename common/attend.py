"""Exact attention of a decode query over selected rows of a key/value cache, the step every KV-selection method
ends with (``prunelab.common.kv_selection``)."""

from __future__ import annotations

import torch

__all__ = ["attend_selected", "gather_rows", "valid_lengths"]


def valid_lengths(valid: torch.Tensor | None, batch: int, T: int, device) -> torch.Tensor:
    """Number of non-padding cache positions per sequence, int64 ``[B]``."""
    if valid is None:
        return torch.full((batch,), T, dtype=torch.int64, device=device)
    return valid.sum(dim=-1, dtype=torch.int64)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, h, index[b, h, i]]`` for ``x [B, H, T, d]`` and int64 ``index [B, H, M]``: ``[B, H, M, d]``.

    One ``index_select`` over the rows of the underlying buffer when ``x`` is a row-contiguous view (the cache's
    case); ``torch.gather`` with an expanded index is several times slower on CPU for the same bytes.
    """
    B, H, T, d = x.shape
    s0, s1, s2, s3 = x.stride()
    if s3 != 1 or s2 != d or s0 % d or s1 % d:
        return x.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, d))
    base = (torch.arange(B, device=x.device) * (s0 // d))[:, None, None] + \
        (torch.arange(H, device=x.device) * (s1 // d))[None, :, None]
    rows = x.as_strided(((B - 1) * (s0 // d) + (H - 1) * (s1 // d) + T, d), (d, 1))
    return rows.index_select(0, (index + base).flatten()).view(B, H, index.shape[2], d)


def attend_selected(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                    keep: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Exact softmax attention of a decode query over selected cache rows (the "focused attention" step).

    Args:
        query: ``[B, Hq, 1, d]``.
        keys: ``[B, Hkv, T, d]``; values the same shape.
        index: selected positions, int64, either ``[B, Hq, N]`` (one set per query head) or ``[B, Hkv, N]`` (one
            set shared by the query heads of a key/value head, so each row is read once).
        keep: bool, same shape as ``index``: which selected entries count (``None``: all). Rows need one.
        scaling: softmax scale (``1/sqrt(d)`` for these models).

    Returns:
        ``[B, Hq, 1, d]`` in the query's dtype.
    """
    B, hq, _, d = query.shape
    hkv = keys.shape[1]
    g = hq // hkv
    n = index.shape[2]
    per_query_head = index.shape[1] == hq and g > 1
    flat = index.reshape(B, hkv, g * n) if per_query_head else index  # rows of each query head's kv head
    k_sel, v_sel = gather_rows(keys, flat), gather_rows(values, flat)
    if per_query_head:  # [B, Hq, N, d]: query head h reads its own rows
        k_sel, v_sel = k_sel.view(B, hq, n, d), v_sel.view(B, hq, n, d)
        mask = None if keep is None else keep.view(B, hq, 1, n)
    else:  # [B, Hkv, N, d] shared by the g query heads of each key/value head
        mask = None if keep is None else keep.view(B, hkv, 1, n).repeat_interleave(g, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, k_sel, v_sel, attn_mask=mask, scale=scaling,
                                                           enable_gqa=not per_query_head)
    return out.reshape(B, hq, 1, d)
