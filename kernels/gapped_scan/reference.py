"""Plain float32 PyTorch reference for :func:`prunelab.kernels.gapped_scan.gapped_scan`.

A loop over the K kept tokens, one vectorised ``[B, D, N]`` state update per step: O(B * D * N * K) work in K
sequential steps, against O(B * D * N * L) in L steps for a full-length scan that walks the pruned slots too.
It is the readable definition of the op and the oracle the Triton kernel is tested against, not a fast path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gapped_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    positions: torch.Tensor,
    gap_delta: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Selective scan over the kept tokens, with the pruned slots between them decaying the state; float32.

    For kept token ``k`` at original position ``p_k`` (``p_{-1} = -1``, ``h = 0`` before the first token):

        g_k = p_k - p_{k-1} - 1                                    pruned slots since the previous kept token
        Δ_k = softplus(delta_k + delta_bias)                       (softplus only when delta_softplus)
        h   = exp(A * (gap_delta * g_k + Δ_k)) * h + Δ_k B_k u_k   = exp(Δ_k A) (exp(gap_delta A)^g_k h) + Δ_k B_k u_k
        y_k = <C_k, h> + D u_k,  then y_k * silu(z_k)

    The gap decay and the token's own decay share one ``exp``: ``exp(a) exp(b) = exp(a + b)``.

    Args:
        u: [B, D, K] inputs at the kept tokens.
        delta: [B, D, K] step sizes at the kept tokens, before ``delta_bias`` and softplus.
        A: [D, N] the (negative) state matrix diagonal.
        B: [B, N, K] input-dependent input projection at the kept tokens.
        C: [B, N, K] input-dependent output projection at the kept tokens.
        positions: [B, K] int64, strictly increasing original positions of the kept tokens.
        gap_delta: [D] the Δ of every pruned slot (used as is: no bias, no softplus).
        D: [D] skip connection, or None.
        z: [B, D, K] gate, or None.
        delta_bias: [D] added to ``delta`` before the softplus, or None.
        delta_softplus: apply softplus to ``delta + delta_bias``.

    Returns:
        y: [B, D, K] in ``u``'s dtype.
    """
    dtype_in = u.dtype
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    prev = torch.cat([positions.new_full((positions.shape[0], 1), -1), positions[:, :-1]], dim=1)
    gaps = (positions - prev - 1).float()  # [B, K]; before the first token the state is zero, so its gap is moot
    decay_dt = delta + gap_delta.float()[None, :, None] * gaps[:, None, :]  # [B, D, K]

    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # [B, D, N]
    ys = []
    for k in range(u.shape[2]):
        dA = torch.exp(decay_dt[:, :, k, None] * A)  # [B, D, N]
        dBu = (delta[:, :, k] * u[:, :, k])[:, :, None] * B[:, None, :, k]
        h = dA * h + dBu
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, k]))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in)
