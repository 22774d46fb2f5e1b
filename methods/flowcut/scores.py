"""FlowCut's scores (Tong et al., NeurIPS 2025, arXiv 2505.19536): information flow through the CLS token.

All functions take raw per-head statistics of one encoder layer for a batch of rows (tiles or images) and return
per-token scores; the method (``method.py``) decides when and how many tokens to drop.

- relation score ``a_j``: the CLS query's attention to patch ``j``, averaged over heads (the CLS column dropped);
- semantic score ``s_j``: how much the CLS *value* attends to patch ``j``'s value: a softmax over every token
  (CLS included, no ``1/sqrt(d)`` scaling, as the official code computes it), averaged over heads, the CLS entry
  dropped; ``semantic="cosine"`` is the paper's description instead (cosine of the head-averaged values, clamped
  at 0 so that it normalises like a score);
- information density ``rho_j = ||mean_h v_j||_1``;
- layer score ``S_j = (a_j / sum a + s_j / sum s) * rho_j``, accumulated over layers by an EMA;
- the prune count from the entropy of ``a``: ``P = round((N - T) / sqrt(R) * (1 - r_H^2))``, ``r_H = H(a) / ln N``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SEMANTICS", "density", "ema", "entropy_ratio", "layer_score", "prune_count", "relation", "semantic",
           "share"]

SEMANTICS = ("softmax", "cosine")


def relation(cls_row: torch.Tensor) -> torch.Tensor:
    """``a`` [rows, n] from the CLS row over the patches, per head [rows, H, n]."""
    return cls_row.float().mean(1)


def semantic(values: torch.Tensor, mode: str = "softmax") -> torch.Tensor:
    """``s`` [rows, n] from the values [rows, H, 1 + n, d] of one layer, the CLS first."""
    v = values.float()
    if mode == "softmax":  # CLS value against every value, no scaling; softmax over all tokens, CLS dropped after
        return (v[:, :, :1] @ v.transpose(-1, -2))[:, :, 0].softmax(-1)[:, :, 1:].mean(1)
    if mode == "cosine":
        mean = v.mean(1)  # [rows, 1 + n, d]
        return torch.nn.functional.cosine_similarity(mean[:, :1], mean[:, 1:], dim=-1).clamp(min=0)
    raise ValueError(f"semantic: expected one of {SEMANTICS}, got {mode!r}")


def density(values: torch.Tensor) -> torch.Tensor:
    """``rho`` [rows, n]: the L1 norm of the head-averaged value of each patch (values [rows, H, 1 + n, d])."""
    return values.float()[:, :, 1:].mean(1).abs().sum(-1)


def share(x: torch.Tensor) -> torch.Tensor:
    """``x / sum x`` over the last dimension (0 stays 0)."""
    return x / x.sum(-1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)


def layer_score(a: torch.Tensor, s: torch.Tensor | None, rho: torch.Tensor) -> torch.Tensor:
    """``S = (a / sum a + s / sum s) * rho``; without a semantic term (Qwen2.5-VL's tower) ``S = a * rho``."""
    if s is None:
        return a * rho
    return (share(a) + share(s)) * rho


def ema(previous: torch.Tensor | None, current: torch.Tensor, weight: float = 0.5) -> torch.Tensor:
    """The cumulative score: ``current`` at the first scored layer, then ``weight * previous + (1 - weight) *
    current``."""
    return current if previous is None else weight * previous + (1 - weight) * current


def entropy_ratio(a: torch.Tensor) -> torch.Tensor:
    """``H(a / sum a) / ln N`` per row, in float32 with the zero entries clamped (no NaN on an exact zero)."""
    p = share(a.float())
    n = a.shape[-1]
    if n < 2:
        return torch.ones(a.shape[:-1])
    h = -(p * p.clamp(min=1e-30).log()).sum(-1)
    return (h / math.log(n)).clamp(0, 1) + 0.0  # + 0.0: no negative zero


def prune_count(n: int, target: int, remaining: int, r_h: float) -> int:
    """Patches to drop at a layer with ``remaining`` layers left before the feature layer (an even count);
    ``remaining = 0`` forces the final cut to ``target``. Never drops below ``target``."""
    if n <= target:
        return 0
    if remaining == 0:
        return n - target
    return min(n - target, max(0, round((n - target) / math.sqrt(remaining) * (1 - r_h ** 2))))
