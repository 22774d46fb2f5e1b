"""DivPrune's token selection: greedy max-min diversity on cosine distance, as pure tensor functions.

Paper: *DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models*, Saeed Ranjbar Alvar,
Gursimran Singh, Mohammad Akbari, Yong Zhang, CVPR 2025 (arXiv 2503.02175). Pruning is cast as the Max-Min
Diversity Problem (MMDP) over the projected visual tokens and solved greedily (farthest-point selection).

Official repository: ``vbdi/divprune`` (CC BY-NC 4.0), method ``DivPrune`` in
``LLaVA/llava/model/llava_arch.py``, read at commit 799e2d9 to match its behaviour; no code or text is copied.

Our default (the paper's algorithm: the MMDP formulation and its greedy solution in the method section):

* ``Dist = 1 - cos`` in float32 whatever the input dtype (:func:`cosine_distance`).
* First pick ``s_0 = argmax_j min_{i != j} Dist[i, j]``: the token whose nearest neighbour is farthest.
* Then ``s_t = argmax_{j not in S} min_{s in S} Dist[s, j]`` with a running min (``O(kM)`` after the
  matmul, against the official ``O(k^2 M)`` loop; same picks, since ``min`` is exact).
* Chosen tokens are masked, so the result is always ``k`` unique indices, and ``k = M`` keeps every token.
* Ties go to the lower index, so the result is deterministic.
* Batches of any size, with an optional ``valid`` mask for ragged (padded) rows.

``official_quirks=True`` reproduces the official code instead, per difference:

1. Chosen tokens are not masked (the official ``DivPrune`` loop). The argmax runs over every token, and a chosen token
   scores ``Dist[s, s]``, about 0. When every unselected token also scores about 0 (exact duplicates),
   a chosen index can be picked again, and the sorted result then holds fewer than ``k`` distinct
   indices. The kept-token contract (unique indices) does not hold in this mode.
2. First pick by the 2nd-smallest entry of each column of ``Dist`` (the official ``DivPrune``), not by
   ``min_{i != j}``. It differs when rounding leaves ``Dist[j, j]`` above some other entry of column ``j``.
3. Distances in the input dtype (fp16 or bf16 for a half-precision LMM): ``x / ||x||``, the matmul and
   ``1 - cos`` are each rounded to ``x.dtype``. This is what the official code does (it normalises and
   multiplies in the model dtype).

Not reproduced, because it is a failure rather than a behaviour: an all-zero token makes the official
normalisation divide by zero (NaN); here it has distance 1 to every token in both modes. The budget rule
``k = int(round(r * M))`` and the batch-1, fixed-offset assumptions (the official
``prepare_inputs_labels_for_multimodal``) belong to the method object and adapters, not to these functions;
``k`` is given here.
"""

from __future__ import annotations

import torch

from prunelab.kernels.dispatch import check_impl
from prunelab.kernels.max_min_diversity import (
    check_max_min_inputs,
    cosine_distance_ref,
    max_min_diversity_order,
)

__all__ = ["cosine_distance", "max_min_diversity"]


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine distance of tokens, computed in float32.

    Args:
        x: Tokens, shape ``[B, M, C]``, float32/float16/bfloat16.

    Returns:
        ``Dist [B, M, M]`` float32 with ``Dist[b, i, j] = 1 - cos(x[b, i], x[b, j])``, in ``[0, 2]`` up to
        rounding (the diagonal is about 0, not forced to 0). An all-zero token is at distance 1 from every
        token, itself included.

    Raises:
        ValueError: ``x`` is not a finite float tensor of shape ``[B, M, C]``.
    """
    check_max_min_inputs(x, 1, None, finite=False)
    return cosine_distance_ref(x)  # checks NaN / inf on the row norms


def max_min_diversity(
    x: torch.Tensor,
    k: int,
    *,
    official_quirks: bool = False,
    valid: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Indices of ``k`` tokens chosen greedily for max-min diversity (DivPrune, Sec. 3).

    Args:
        x: Tokens, shape ``[B, M, C]`` (DivPrune: the projected visual embeddings), float32/float16/bfloat16,
            finite everywhere, padding included.
        k: Tokens to keep per batch element, ``1 <= k <= M`` and at most each row's valid count.
        official_quirks: Reproduce the official code's differences (see the module docstring) instead of the
            paper's algorithm. Runs the torch path only.
        valid: Optional bool mask ``[B, M]`` for ragged batches; invalid tokens are never chosen and never
            count as a neighbour. With ``official_quirks`` each row runs on its valid tokens alone.
        impl: ``"auto"``, ``"torch"`` or ``"triton"``, as in :func:`prunelab.kernels.max_min_diversity`.

    Returns:
        ``keep [B, k]`` int64, sorted ascending. Unique by default; with ``official_quirks`` an index can
        repeat (quirk 1).

    Raises:
        ValueError: bad ``x``, ``k``, ``valid`` or ``impl`` (the message names the parameter).
    """
    if not isinstance(official_quirks, bool):
        raise ValueError(f"official_quirks: expected a bool, got {official_quirks!r}")
    if not official_quirks:
        order, _ = max_min_diversity_order(x, k, valid=valid, impl=impl)
        return order.sort(dim=-1).values
    check_impl(impl)
    if impl == "triton":
        raise ValueError("impl: official_quirks=True reproduces the official torch ops and runs only with "
                         "impl='torch' or 'auto'")
    check_max_min_inputs(x, k, valid)
    keep = []
    for b in range(x.shape[0]):  # the official code handles one image at a time (it reads sample 0 only)
        idx = torch.arange(x.shape[1], device=x.device)
        if valid is not None:
            idx = idx[valid[b]]
        keep.append(idx[_official_order(x[b, idx], k)])
    return torch.stack(keep).sort(dim=-1).values


def _official_distance(x: torch.Tensor) -> torch.Tensor:
    """Quirk 3: ``1 - cos`` of ``x [M, C]`` with every step rounded to ``x.dtype``; returns ``[M, M]``."""
    # the clamp only changes all-zero rows (NaN in the official code, distance 1 here)
    n = x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    return 1.0 - n @ n.T


def _official_order(x: torch.Tensor, k: int) -> torch.Tensor:
    """The official greedy picks for one row ``x [M, C]``, in pick order, as int64 ``[k]``."""
    M = x.shape[0]
    if M == 1:  # the official top-2 needs two tokens; a single token is the only choice
        return torch.zeros(k, dtype=torch.int64, device=x.device)
    dist = _official_distance(x)
    # quirk 2: the 2nd-smallest entry of column j stands for min_{i != j} Dist[i, j]
    scores = dist.topk(2, dim=0, largest=False).values[1]
    order = torch.empty(k, dtype=torch.int64, device=x.device)
    for t in range(k):
        order[t] = scores.argmax()  # first maximum on ties, as torch.argmax documents
        # quirk 1: the chosen index is not masked; a running min equals the official re-reduction exactly
        scores = dist[order[t]] if t == 0 else torch.minimum(scores, dist[order[t]])
    return order
