"""Plain float32 PyTorch reference for greedy max-min diversity selection (DivPrune's MMDP solver).

It is the readable definition of the op and the oracle the Triton kernel is tested against. After the
``O(M^2 C)`` distance matmul the greedy loop is ``O(k M)`` per batch element: it keeps a running vector
``m_j = min_{s in S} Dist[s, j]`` (DivPrune, Ranjbar Alvar et al., CVPR 2025, Sec. 3 / Alg. 1 in its efficient
form) instead of re-reducing over every chosen row at each step, which is ``O(k^2 M)``. ``min`` and ``argmax``
are exact, so both forms pick the same tokens from the same distance matrix.
"""

from __future__ import annotations

import torch


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` upcast to float32 with every row scaled to unit L2 norm; a zero row stays zero.

    The finiteness check runs on the ``[B, M]`` row norms, not on all ``B * M * C`` entries: a NaN or inf
    entry makes its row's norm NaN or inf. A finite row whose squared norm overflows float32 (entries above
    about 1e19) is rescaled by its largest entry first, so it is normalised rather than flushed to zero.

    Raises:
        ValueError: ``x`` contains NaN or inf.
    """
    xf = x.float()
    norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
    if not bool(torch.isfinite(norm).all()):
        if not bool(torch.isfinite(xf).all()):
            raise ValueError("x: contains NaN or inf")
        xf = xf / xf.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
    return xf / norm.clamp_min(1e-12)  # F.normalize's eps: a zero row stays zero


def cosine_distance_ref(x: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine distance ``Dist[b, i, j] = 1 - cos(x[b, i], x[b, j])``, in float32.

    Args:
        x: Tokens, shape ``[B, M, C]``, any float dtype (upcast to float32 first), finite.

    Returns:
        ``[B, M, M]`` float32. A zero row normalises to zero, so it sits at distance 1 from every token,
        itself included, instead of producing NaN.

    Raises:
        ValueError: ``x`` contains NaN or inf (see :func:`unit_rows`).
    """
    n = unit_rows(x)
    # in place: at M = 2880 each [M, M] temporary is 33 MB per batch element
    return torch.matmul(n, n.transpose(-1, -2)).neg_().add_(1.0)


def first_pick_ref(dist: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DivPrune's first pick: the valid token whose nearest valid neighbour is farthest.

    ``s_0 = argmax_j min_{i != j} Dist[i, j]`` over valid ``i`` and ``j``; ties go to the lower index. A row
    with a single valid token gives it a nearest-neighbour distance of ``+inf``.

    Args:
        dist: Distances, shape ``[B, M, M]`` float32.
        valid: Optional bool mask ``[B, M]``; ``None`` means every token is valid.

    Returns:
        ``(index [B] int64, nearest-neighbour distance of that index [B] float32)``.
    """
    nn_dist = dist.clone()
    nn_dist.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))  # i != j: a token is not its own neighbour
    if valid is not None:
        nn_dist.masked_fill_(~valid[:, :, None], float("inf"))  # invalid rows are nobody's neighbour
    nn_dist = nn_dist.amin(dim=-2)  # column-wise: min over i of Dist[i, j]
    if valid is not None:
        nn_dist.masked_fill_(~valid, float("-inf"))  # invalid tokens are never picked
    # argmax, not max: torch documents argmax's index among equal maxima as the first one
    idx = nn_dist.argmax(dim=-1)
    return idx, nn_dist.gather(-1, idx[:, None])[:, 0]


def greedy_max_min_ref(
    dist: torch.Tensor, k: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy farthest-point (Gonzalez) selection on a distance matrix, in pick order.

    Step 0 is :func:`first_pick_ref`. Step ``t >= 1`` picks ``s_t = argmax_{j not in S} m_j`` with
    ``m_j = min_{s in S} Dist[s, j]``; chosen and invalid tokens score ``-inf`` so they are never picked
    (again). Ties go to the lower index (``torch.argmax`` returns the first maximum).

    Args:
        dist: Distances, shape ``[B, M, M]`` float32; row ``s`` is read when ``s`` is chosen.
        k: Tokens to pick, ``1 <= k <=`` the valid count of every row (checked by the caller).
        valid: Optional bool mask ``[B, M]``; ``None`` means every token is valid.

    Returns:
        ``(order, score)``: ``order [B, k]`` int64, the picks in greedy order; ``score [B, k]`` float32, the
        value each pick maximised (its nearest-neighbour distance at step 0, ``m_{s_t}`` afterwards).
    """
    B, M, _ = dist.shape
    order = torch.empty(B, k, dtype=torch.int64, device=dist.device)
    score = torch.empty(B, k, dtype=torch.float32, device=dist.device)
    order[:, 0], score[:, 0] = first_pick_ref(dist, valid)
    if dist.device.type == "cpu":
        return _greedy_rows_cpu(dist, order, score, valid)
    return _greedy_batched(dist, order, score, valid)


def _greedy_batched(dist: torch.Tensor, order: torch.Tensor, score: torch.Tensor,
                    valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps ``t >= 1`` of :func:`greedy_max_min_ref` for the whole batch at once, without host syncs."""
    B, k = order.shape
    rows = torch.arange(B, device=dist.device)
    m = dist[rows, order[:, 0]].clone()  # [B, M] running min over the chosen set
    if valid is not None:
        m.masked_fill_(~valid, float("-inf"))
    m[rows, order[:, 0]] = float("-inf")
    for t in range(1, k):
        j = m.argmax(dim=-1)
        order[:, t] = j
        score[:, t] = m.gather(-1, j[:, None])[:, 0]
        torch.minimum(m, dist[rows, j], out=m)  # -inf entries (chosen, invalid) stay -inf
        m[rows, j] = float("-inf")
    return order, score


def _greedy_rows_cpu(dist: torch.Tensor, order: torch.Tensor, score: torch.Tensor,
                     valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps ``t >= 1`` of :func:`greedy_max_min_ref` on CPU, one batch row at a time: the same picks.

    At LLaVA sizes each step is a handful of microsecond-scale ops, so the op count is the cost. Python-int
    indices (a row view ``d[j]``, a scalar store) and one ``max`` for value and index (the first maximum, as
    ``argmax``) make three ops per step instead of the batched loop's six. On a GPU the ``int()`` would
    synchronise every step, so the batched loop stays there.
    """
    ninf = float("-inf")
    for b in range(dist.shape[0]):
        d = dist[b]
        j = int(order[b, 0])
        picks, values = [j], [float(score[b, 0])]
        m = d[j].clone()
        if valid is not None:
            m.masked_fill_(~valid[b], ninf)
        m[j] = ninf
        for _ in range(1, order.shape[1]):
            v, idx = m.max(dim=0)
            j = int(idx)
            picks.append(j)
            values.append(float(v))
            torch.minimum(m, d[j], out=m)  # -inf entries (chosen, invalid) stay -inf
            m[j] = ninf
        order[b] = torch.tensor(picks)
        score[b] = torch.tensor(values)
    return order, score
