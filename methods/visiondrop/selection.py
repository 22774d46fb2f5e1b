"""VisionDrop's tensor functions: visual-only scores, dominant tokens and contextual merging.

Paper: *Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment* (VisionDrop), AAAI 2026,
arXiv 2506.22283. Official code consulted for behaviour: ``Ruixxxx/VisionDrop`` (Apache-2.0), the snapshot at commit
f7a9444 held in this workspace's code index (the live repository was not reachable): ``llava/visionzip/clip_encoder.py``
(encoder stage) and ``llava/model/modeling_llama_visiondrop.py`` (LLM stages). Nothing is copied. These functions
know no model; ``method.py`` feeds them the statistics the stage engine hands over. What differs from the official
code is listed in README.md.

One stage, on the ``n`` tokens of one row (a CLIP tile, a Qwen2.5-VL image, the image span inside the LLM):

1. a score per token from visual-to-visual attention (:func:`cls_scores`, :func:`mean_query_scores`; inside the
   LLM the engine's ``image_mean`` rows, ``prunelab.kernels.image_query_received``);
2. the ``d`` candidates with the highest score are *dominant* and kept as they are (:func:`dominant_tokens`);
3. the remaining candidates ``R`` (sequence order) give ``c`` *targets*, every ``step``-th of them with
   ``step = max(1, |R| // c)``, the first ``c`` (:func:`contextual_targets`); every other token of ``R`` joins the
   target whose key is most cosine-similar (hard argmax, :func:`assign_members`);
4. a target becomes ``h_target + mean(h of its members)`` (a target without members stays ``h_target``): a
   :class:`~prunelab.common.reduction.Merge` with ``average=False`` and weights ``1 / members``
   (:func:`visiondrop_reduction`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prunelab.common.reduction import Merge, Reduction

__all__ = ["assign_members", "cls_scores", "contextual_targets", "dominant_tokens", "head_mean_keys",
           "mean_query_scores", "visiondrop_reduction"]


def _finite(x: torch.Tensor, name: str) -> torch.Tensor:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: non-finite values (NaN or inf activations) reached VisionDrop's {name}")
    return x


# -- scores ------------------------------------------------------------------------------------------------------
def cls_scores(cls_row: torch.Tensor) -> torch.Tensor:
    """Encoder score ``a_j = sum_h A_h[CLS, j]`` (the paper's dominant-token selection in the encoder; official
    ``clip_encoder.py`` sums the CLS row over heads).

    Args:
        cls_row: [rows, H, n] the CLS query's attention probabilities over ``n`` patches, per head.

    Returns:
        [rows, n] float32.
    """
    return _finite(cls_row.float().sum(1), "scores")


def mean_query_scores(queries: torch.Tensor, keys: torch.Tensor, scale: float, prefix: int = 0) -> torch.Tensor:
    """Encoder score for CLS-free towers: the attention of the mean patch query, summed over heads.

    ``q_bar = mean_i q_i`` over the patch queries (the ``prefix`` leading tokens, e.g. a CLS, are keys only), then
    ``a_j = sum_h softmax_j(q_bar_h . k_hj * scale)`` over every key, returned for the patch columns.

    Args:
        queries / keys: [rows, H, prefix + n, d] per-head vectors of one encoder layer.
        scale: the layer's logit scale (``d ** -0.5``).
        prefix: leading tokens that are not patches.

    Returns:
        [rows, n] float32.
    """
    q, k = queries.float(), keys.float()
    q_bar = q[:, :, prefix:].mean(2, keepdim=True)  # [rows, H, 1, d]
    probs = ((q_bar @ k.transpose(-1, -2)) * scale).softmax(-1)[:, :, 0]  # [rows, H, prefix + n]
    return _finite(probs[:, :, prefix:].sum(1), "scores")


def head_mean_keys(keys: torch.Tensor) -> torch.Tensor:
    """The merge metric: keys averaged over heads, ``[..., H, n, d] -> [..., n, d]``.

    For grouped-query attention the mean over the ``Hkv`` key heads equals the mean over the ``H`` query heads' keys
    (``repeat_kv`` repeats every key head ``H / Hkv`` times), so no expansion is needed for the metric.
    """
    return _finite(keys.float().mean(-3), "keys")


# -- selection and merging ---------------------------------------------------------------------------------------
def dominant_tokens(score: torch.Tensor, d: int, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """The ``d`` candidates with the highest score, ascending (ties to the lower index).

    Args:
        score: [n].
        d: dominant count, ``0 <= d <= candidates``.
        candidates: bool [n] (default: all).

    Returns:
        int64 [d] token indices.
    """
    idx = torch.arange(score.numel(), device=score.device)
    if candidates is not None:
        idx = idx[candidates]
    order = torch.sort(score[idx], descending=True, stable=True).indices[:d]
    return idx[order].sort().values


def contextual_targets(r: int, c: int, device=None) -> torch.Tensor:
    """Positions in ``R`` (``r`` tokens, sequence order) of the targets: ``0, step, 2 step, ...``, the first ``c``,
    with ``step = max(1, r // c)`` (official ``clip_encoder.py``). ``c = 0`` gives none."""
    if c <= 0 or r <= 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.arange(0, r, max(1, r // c), device=device)[:c]


def assign_members(metric: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token of ``R`` that is not a target joins the target of highest cosine similarity (hard argmax; ties
    to the first target).

    Args:
        metric: [r, D] the merge metric of ``R``'s tokens (keys averaged over heads).
        targets: int64 [c] positions of the targets in ``R``.

    Returns:
        ``(members, slot)``: int64 [r - c] positions of the members in ``R`` and int64 [r - c] the index into
        ``targets`` each one joins; both empty when there is no target.
    """
    is_target = torch.zeros(metric.shape[0], dtype=torch.bool, device=metric.device)
    is_target[targets] = True
    members = (~is_target).nonzero().flatten()
    if members.numel() == 0 or targets.numel() == 0:  # no targets (c = 0): the rest is dropped, nothing merges
        members = members[:0]
        return members, torch.zeros_like(members)
    unit = F.normalize(metric.float(), dim=-1)
    return members, (unit[members] @ unit[targets].T).argmax(-1)


def _one_row(score, metric, d, c, candidates):
    """Kept indices [K] and the merge (src, dst, weight) of one row."""
    n = score.numel()
    cand = torch.ones(n, dtype=torch.bool, device=score.device) if candidates is None else candidates
    dom = dominant_tokens(score, d, cand)
    rest_mask = cand.clone()
    rest_mask[dom] = False
    rest = rest_mask.nonzero().flatten()  # R, in sequence order
    t = contextual_targets(rest.numel(), c, score.device)
    members, slot = assign_members(metric[rest], t)
    targets = rest[t]
    keep = torch.cat([dom, targets, (~cand).nonzero().flatten()]).sort().values
    src, dst = rest[members], torch.searchsorted(keep, targets[slot])
    weight = 1.0 / torch.bincount(slot, minlength=t.numel()).clamp(min=1)[slot].float()
    return keep, src, dst, weight


def visiondrop_reduction(score: torch.Tensor, metric: torch.Tensor, d: int, c: int,
                         candidates: torch.Tensor | None = None) -> Reduction:
    """One VisionDrop step on ``rows`` rows of ``n`` tokens: ``d`` dominant and ``c`` contextual tokens per row.

    Tokens outside ``candidates`` (NeXT's ``image_newline`` tokens) are kept and take no part.

    Args:
        score: [rows, n] token scores.
        metric: [rows, n, D] merge metric (keys averaged over heads; L2-normalised here).
        d: dominant tokens per row.
        c: contextual tokens per row; ``d + c`` must not exceed the candidates (every row has as many).
        candidates: bool [rows, n] (default: all).

    Returns:
        A :class:`Reduction` keeping ``d + c`` candidates (and every non-candidate) per row, sorted; the members
        merge into their targets with ``average=False`` and weights ``1 / members``.
    """
    rows, n = score.shape
    _finite(score, "scores")
    _finite(metric, "keys")
    parts = [_one_row(score[i], metric[i], d, c, None if candidates is None else candidates[i]) for i in range(rows)]
    keep = torch.stack([p[0] for p in parts])
    if parts[0][1].numel() == 0:
        return Reduction(keep, n)
    src, dst, weight = (torch.stack([p[j] for p in parts]) for j in (1, 2, 3))
    return Reduction(keep, n, merge=Merge(src, dst, weight, average=False))
