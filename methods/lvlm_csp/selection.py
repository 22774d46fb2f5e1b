"""LVLM_CSP's selections as pure tensor functions (Chen et al., arXiv 2504.10854).

Clustering (the first stage) sends ``N_c`` representatives of an image's ``N`` tokens into the first layers. The
paper studies four selectors:

- :func:`uniform`: ``S[i] = i * floor(N / N_c)``, ``i = 0 .. N_c - 1``;
- :func:`random_tokens`: ``N_c`` tokens drawn uniformly without replacement;
- :func:`cls_attention`: ``TopK(softmax(q_cls K^T / sqrt(d)), N_c)``, the vision encoder's CLS row (heads averaged);
- :func:`seg_first`: instance masks from a light segmenter; instance ``o`` gets ``max(1, floor(N_c area_o / sum
  area))`` of its own tokens.

Scattering (the second stage) re-activates every token; :func:`assign` gives each token its cluster's
representative and :func:`scatter` the value it re-enters with. Pruning (the third stage) keeps the top tokens of the
``[SEG]`` token's attention row (:func:`seg_scores`, then ``prunelab.common.tokens.topk_sorted``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prunelab.common.tokens import topk_sorted

__all__ = ["SCATTER_MODES", "assign", "cls_attention", "random_tokens", "scatter", "seg_first", "seg_scores",
           "uniform"]

SCATTER_MODES = ("reembed", "copy_rep_state", "add_rep_delta")


def uniform(n: int, k: int, device=None) -> torch.Tensor:
    """``i * floor(n / k)`` for ``i < k``: every ``floor(n / k)``-th token from the first."""
    if not 1 <= k <= n:
        raise ValueError(f"clusters: expected a count in [1, {n}], got {k}")
    return torch.arange(k, device=device) * (n // k)


def random_tokens(n: int, k: int, generator: torch.Generator, device=None) -> torch.Tensor:
    """``k`` of ``n`` tokens uniformly without replacement, sorted."""
    if not 1 <= k <= n:
        raise ValueError(f"clusters: expected a count in [1, {n}], got {k}")
    return torch.randperm(n, generator=generator)[:k].sort().values.to(device)


def cls_attention(cls_row: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` patches the CLS query attends to most: ``cls_row`` [H, N] per head, averaged over heads."""
    return topk_sorted(cls_row.float().mean(0), k)


def seg_first(masks: torch.Tensor, k: int) -> torch.Tensor:
    """Representatives from instance masks ``masks`` [O, N] (bool; a token may belong to several instances):
    instance ``o`` of area ``a_o`` tokens gets ``c_o = max(1, floor(k a_o / sum a))`` of its tokens, taken at an even
    stride through them (every ``floor(a_o / c_o)``-th, from its first); tokens of no instance are never chosen.

    The total is at most ``k`` unless there are more instances than ``k`` (each keeps one token); it may fall short
    of ``k`` by the floors. Returns the sorted union."""
    if masks.dim() != 2 or masks.dtype != torch.bool:
        raise ValueError(f"instances: expected a bool [instances, tokens] mask, got {tuple(masks.shape)} "
                         f"{masks.dtype}")
    area = masks.sum(-1)
    masks = masks[area > 0]
    area = area[area > 0]
    if masks.shape[0] == 0:
        raise ValueError("instances: no instance covers any image token")
    counts = (k * area / area.sum()).floor().long().clamp(min=1).minimum(area)
    picks = []
    for mask, a, c in zip(masks, area.tolist(), counts.tolist()):
        tokens = mask.nonzero().flatten()
        picks.append(tokens[torch.arange(c, device=tokens.device) * (a // c)])
    return torch.cat(picks).unique()


def assign(inputs: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:
    """[N] for each token the position in ``reps`` of its cluster's representative: the most cosine-similar
    representative by the tokens' input embeddings ``inputs`` [N, C] (ties to the lower one); each representative is
    its own."""
    x = F.normalize(inputs.float(), dim=-1)
    out = (x @ x[reps].T).argmax(-1)
    out[reps] = torch.arange(reps.numel(), device=reps.device)
    return out


def scatter(mode: str, inputs: torch.Tensor, rep_hidden: torch.Tensor, reps: torch.Tensor,
            members: torch.Tensor) -> torch.Tensor:
    """[N, C] the values the image's tokens re-enter with at the scattering layer.

    Args:
        mode: ``"reembed"`` (every non-representative its input embedding), ``"copy_rep_state"`` (its
            representative's hidden state), ``"add_rep_delta"`` (its input embedding plus its representative's update,
            hidden state minus input embedding). Representatives keep their hidden state in every mode.
        inputs: [N, C] the tokens' input embeddings; ``rep_hidden`` [N_c, C] the representatives' hidden states.
        reps: [N_c] the representatives; ``members`` [N] from :func:`assign`.
    """
    if mode == "reembed":
        out = inputs.clone()
    elif mode == "copy_rep_state":
        out = rep_hidden[members].to(inputs.dtype)
    elif mode == "add_rep_delta":
        out = (inputs + (rep_hidden - inputs[reps].to(rep_hidden.dtype))[members]).to(inputs.dtype)
    else:
        raise ValueError(f"scatter_mode: expected one of {SCATTER_MODES}, got {mode!r}")
    out[reps] = rep_hidden.to(out.dtype)
    return out


def seg_scores(rows: torch.Tensor) -> torch.Tensor:
    """[N] the attention of the ``[SEG]`` queries ``rows`` [H, S, N], averaged over heads and ``[SEG]`` tokens."""
    return rows.float().mean((0, 1))
