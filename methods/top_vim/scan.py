"""Mamba's selective scan in plain PyTorch, float32, for ToP-ViM's Vim backbone.

Paper: Zhan et al., "Exploring Token Pruning in Vision State Space Models", NeurIPS 2024 (arXiv 2409.18962).
Compared against hustvl/Vim at commit dd0358a, ``mamba-1p1p1/mamba_ssm/ops/selective_scan_interface.py``
(``selective_scan_ref``; the CUDA ``selective_scan_fn`` the released models run has the same semantics).

The recurrence (the card's §2, with Vim's input-dependent ``B`` and ``C``), per batch row, channel ``d``, state ``n``:

    Δ_t = softplus(delta_t + delta_bias)                  (when delta_softplus)
    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t,   h_{-1} = 0
    y_t = <C_t, h_t> + D u_t,                 then y_t * silu(z_t) when z is given

Two implementations, chosen by ``impl``:

- ``"loop"``: a sequential loop over L; the source of truth, like mamba-ssm's ``selective_scan_ref``.
- ``"parallel"``: a Hillis-Steele scan over the pairs ``(exp(Δ_t A), Δ_t B_t u_t)`` under the associative
  composition ``(a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2)``: ``ceil(log2 L)`` vectorised steps. Every factor is a
  decay in (0, 1], so no division or log-space rescaling is needed; results equal the loop up to float32 rounding.

What differs from mamba-ssm: only real ``A`` and ``B``, ``C`` of shape [B, N, L] (Vim's case; no complex ``A``, no
grouped or constant ``B``/``C``), no ``return_last_state``; and one addition, ``keep`` (below).

``keep`` ([B, L] bool) is the "decay_only" alignment hook for ToP-ViM's pruning-aware hidden-state alignment (the
card's §2, Step 3, an inferred reading of the paper's Eq. 5-6): at a position with ``keep == False`` the state still
decays by ``exp(Δ_t A)`` but receives no input (``Δ_t B_t u_t`` is zeroed) and the output is exactly 0. The caller
decides what ``delta`` a pruned position carries. ``keep=None`` is the dense scan; all-True equals it bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMPLS = ("loop", "parallel")


def _check(u, delta, A, B, C, D, z, delta_bias, keep, impl) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if u.dim() != 3:
        raise ValueError(f"u: expected [B, D, L], got {tuple(u.shape)}")
    b, d, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta: expected the shape of u {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != d or A.is_complex():
        raise ValueError(f"A: expected real [D={d}, N], got {tuple(A.shape)} ({A.dtype})")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (b, n, length):
            raise ValueError(f"{name}: expected input-dependent [B={b}, N={n}, L={length}], got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (d,):
            raise ValueError(f"{name}: expected [D={d}], got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z: expected the shape of u {tuple(u.shape)}, got {tuple(z.shape)}")
    if keep is not None and (keep.dtype != torch.bool or keep.shape != (b, length)):
        raise ValueError(f"keep: expected bool [B={b}, L={length}], got {keep.dtype} {tuple(keep.shape)}")


def _scan_loop(dA: torch.Tensor, dBu: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``y_t = <C_t, h_t>`` with ``h_t = dA_t h_{t-1} + dBu_t``; dA, dBu: [B, D, L, N], C: [B, N, L] -> [B, D, L]."""
    h = dA.new_zeros(dA.shape[0], dA.shape[1], dA.shape[3])
    ys = []
    for t in range(dA.shape[2]):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    return torch.stack(ys, dim=2)


def _scan_parallel(dA: torch.Tensor, dBu: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Same as :func:`_scan_loop`, by Hillis-Steele doubling over L (``ceil(log2 L)`` steps, O(L log L) work)."""
    a, h = dA, dBu
    step = 1
    while step < dA.shape[2]:
        # each position absorbs the segment ending `step` earlier; the first `step` positions are already complete
        h = torch.cat([h[:, :, :step], a[:, :, step:] * h[:, :, :-step] + h[:, :, step:]], dim=2)
        a = torch.cat([a[:, :, :step], a[:, :, step:] * a[:, :, :-step]], dim=2)
        step *= 2
    return torch.einsum("bdln,bnl->bdl", h, C)


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    keep: torch.Tensor | None = None,
    impl: str = "loop",
) -> torch.Tensor:
    """Mamba's selective scan, computed in float32 (mamba-ssm's ``selective_scan_ref`` semantics).

    Args:
        u: [B, D, L] the input sequence (Vim: the conv1d + SiLU output).
        delta: [B, D, L] the step size before ``delta_bias`` and softplus.
        A: [D, N] the (negative) state matrix diagonal, ``-exp(A_log)``.
        B: [B, N, L] input-dependent input projection.
        C: [B, N, L] input-dependent output projection.
        D: [D] skip connection, ``y += D * u``; None for none.
        z: [B, D, L] gate, ``y *= silu(z)``; None for none.
        delta_bias: [D] added to ``delta`` before the softplus.
        delta_softplus: apply softplus to ``delta`` (Vim: True).
        keep: [B, L] bool, the "decay_only" alignment hook (module docstring); None is the dense scan.
        impl: ``"loop"`` (the reference) or ``"parallel"`` (Hillis-Steele, the same up to float32 rounding).

    Returns:
        y: [B, D, L] in ``u``'s dtype.
    """
    _check(u, delta, A, B, C, D, z, delta_bias, keep, impl)
    dtype_in = u.dtype
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    dA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    dBu = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    if keep is not None:
        # a pruned slot only decays the state: its input term is removed, exp(delta A) is kept
        dBu = torch.where(keep[:, None, :, None], dBu, 0.0)
    y = _scan_loop(dA, dBu, C) if impl == "loop" else _scan_parallel(dA, dBu, C)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    if keep is not None:
        y = torch.where(keep[:, None, :], y, 0.0)
    return y.to(dtype_in)
