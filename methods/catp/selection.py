"""CATP's token scores and selections as pure tensor functions (Li et al., AAAI 2026, arXiv 2508.07871).

Stage 1 (Sec. "Stage 1", between the projector and the decoder) keeps, per image ``i``, ``Y_i`` of its projected
tokens ``X_i`` maximising ``F(Y) = F_div(Y) + lambda_1 F_align(Y)`` with the cosine rescaled to [0, 1],
``sim(x, y) = (cos(x, y) + 1) / 2``:

- ``F_div(Y) = sum_{x in X_i} max_{y in Y} sim(y, x)``, facility location (monotone submodular);
- ``F_align(Y) = sum_{y in Y} sim(y, t_i)``, ``t_i`` the mean input embedding of the image's paired text.

:func:`facility_location` solves it greedily, as the paper does: each step adds the candidate of largest marginal gain
``sum_x max(0, sim(c, x) - best_x) + lambda_1 sim(c, t_i)``, where ``best_x`` is ``x``'s best similarity to the
tokens chosen so far (0 before the first). The running vector ``best`` makes one step an ``[S, S]`` subtraction
after a single ``[S, S]`` similarity matmul, ``O(k S^2)`` in all. The greedy value is at least ``1 - 1/e`` of the
optimum (Nemhauser et al., 1978); the gains it records never increase.

Stage 2 (Sec. "Stage 2", progressive adaptation in shallow decoder layers):

- :func:`context_scores`: a context image token ``c`` scores ``max(0, A_K[q, c] - A_{K-1}[q, c]) +
  lambda_2 cos(h^K_c, mean_q h^K)``, ``A_l`` layer ``l``'s head-averaged attention from the query sample's last token
  ``q``, ``mean_q h^K`` the mean layer-K hidden state of the query sample's tokens;
- :func:`query_scores`: a query image token scores ``cos(h^{K+1}_q, mean_c h^{K+1})``, the mean over the pruned
  context;
- the kept indices are the highest scores' (``prunelab.common.tokens.topk_sorted``: sorted, ties to the lower index).

The paper gives no official code; nothing here is compared against one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["context_scores", "facility_location", "query_scores", "rescaled_cosine"]


def rescaled_cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(cos(x_i, y_j) + 1) / 2`` in [0, 1] for ``x`` [N, C] and ``y`` [M, C], in float32 (an all-zero row has
    cosine 0, so 0.5 to everything)."""
    x, y = F.normalize(x.float(), dim=-1), F.normalize(y.float(), dim=-1)
    return ((x @ y.T + 1) / 2).clamp(0, 1)


def facility_location(x: torch.Tensor, text: torch.Tensor | None, k: int, lambda_1: float = 0.7
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ``argmax_{|Y| = k} F_div(Y) + lambda_1 F_align(Y)`` over the rows of ``x``.

    Args:
        x: [S, C] one image's tokens (stage 1: its projected embeddings), or [B, S, C] images of equal size, selected
            together in one loop (one ``[B, S, S]`` step per pick instead of ``B`` small ones).
        text: [C] (or [B, C]) the mean embedding of the image's paired text; ``None`` (no text) drops the alignment
            term.
        k: tokens to keep, in [1, S].
        lambda_1: the alignment weight; ``float("inf")`` ranks by alignment alone (ties by diversity).

    Returns:
        (kept indices [k] (or [B, k]), sorted; the marginal gain of each pick, in pick order; with ``lambda_1 = inf``
        the gains are the diversity parts).
    """
    single = x.dim() == 2
    if single:
        x, text = x[None], None if text is None else text[None]
    B, S = x.shape[:2]
    if not 1 <= k <= S:
        raise ValueError(f"k: expected a count in [1, {S}], got {k}")
    if lambda_1 < 0:
        raise ValueError(f"lambda_1: expected a weight >= 0, got {lambda_1}")
    xn = F.normalize(x.float(), dim=-1)
    sim = ((xn @ xn.transpose(1, 2) + 1) / 2).clamp(0, 1)  # [B, candidate, x]
    if text is not None:
        align = ((xn @ F.normalize(text.float(), dim=-1)[..., None])[..., 0] + 1) / 2
    else:
        align = sim.new_zeros(B, S)
    best, chosen = sim.new_zeros(B, S), torch.zeros(B, S, dtype=torch.bool, device=x.device)
    rows = torch.arange(B, device=x.device)
    picks, gains = [], []
    for _ in range(k):
        div = (sim - best[:, None]).clamp(min=0).sum(-1)
        if lambda_1 == float("inf"):  # alignment first, diversity breaks ties
            key = torch.where(chosen, -1.0, align)
            cand = key == key.amax(-1, keepdim=True)
            c = torch.where(cand, div, float("-inf")).argmax(-1)
            gains.append(div[rows, c])
        else:
            gain = torch.where(chosen, float("-inf"), div + lambda_1 * align)
            c = gain.argmax(-1)
            gains.append(gain[rows, c])
        picks.append(c)
        chosen[rows, c] = True
        best = torch.maximum(best, sim[rows, c])
    keep, gains = torch.stack(picks, -1).sort(-1).values, torch.stack(gains, -1)
    return (keep[0], gains[0]) if single else (keep, gains)


def context_scores(attn_k: torch.Tensor, attn_prev: torch.Tensor, hidden: torch.Tensor, query_mean: torch.Tensor,
                   lambda_2: float = 0.6) -> torch.Tensor:
    """``max(0, A_K - A_{K-1}) + lambda_2 cos(h_c, query_mean)`` per context token, float32.

    Args:
        attn_k / attn_prev: [N] the head-averaged attention the query's last token gives each token at layers K and
            K - 1.
        hidden: [N, C] the tokens' layer-K hidden states; ``query_mean`` [C] the query sample's mean.
    """
    increase = (attn_k.float() - attn_prev.float()).clamp(min=0)
    return increase + lambda_2 * F.cosine_similarity(hidden.float(), query_mean.float()[None], dim=-1)


def query_scores(hidden: torch.Tensor, context_mean: torch.Tensor) -> torch.Tensor:
    """``cos(h_q, context_mean)`` per query image token [N], float32."""
    return F.cosine_similarity(hidden.float(), context_mean.float()[None], dim=-1)
