"""Mamba's selective scan in plain PyTorch, float32, for ToP-ViM's Vim backbone.

Paper: Zhan et al., "Exploring Token Pruning in Vision State Space Models", NeurIPS 2024 (arXiv 2409.18962).
Compared against hustvl/Vim at commit dd0358a, ``mamba-1p1p1/mamba_ssm/ops/selective_scan_interface.py``
(``selective_scan_ref``; the CUDA ``selective_scan_fn`` the released models run has the same semantics).

The recurrence (Mamba's selective SSM, with Vim's input-dependent ``B`` and ``C``), per batch row, channel ``d``,
state ``n``:

    Δ_t = softplus(delta_t + delta_bias)                  (when delta_softplus)
    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t,   h_{-1} = 0
    y_t = <C_t, h_t> + D u_t,                 then y_t * silu(z_t) when z is given

Two implementations, chosen by ``impl``:

- ``"loop"``: a sequential loop over L; the source of truth, like mamba-ssm's ``selective_scan_ref``.
- ``"parallel"``: a Hillis-Steele scan over the pairs ``(exp(Δ_t A), Δ_t B_t u_t)`` under the associative
  composition ``(a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2)``: ``ceil(log2 L)`` vectorised steps. Every factor is a
  decay in (0, 1], so no division or log-space rescaling is needed; results equal the loop up to float32 rounding.
  Its backward is the adjoint recurrence run the same way (not autograd through the steps).
- ``"stepped"``: the loop with each step's decay and input formed on a [B, D, N] slice (no [B, D, L, N] tensor
  is built) and a hand-written backward (:class:`_SteppedScan`): O(L) work, no autograd graph over the steps; for
  training on CPU, where the other paths are bound by moving [B, D, L, N] tensors through memory.

What differs from mamba-ssm: only real ``A`` and ``B``, ``C`` of shape [B, N, L] (Vim's case; no complex ``A``, no
grouped or constant ``B``/``C``), no ``return_last_state``; and one addition, ``keep`` (below).

``keep`` ([B, L] bool) is the "decay_only" alignment hook for ToP-ViM's pruning-aware hidden-state alignment (an
inferred reading of the paper's Eq. 5-6): at a position with ``keep == False`` the state still
decays by ``exp(Δ_t A)`` but receives no input (``Δ_t B_t u_t`` is zeroed) and the output is exactly 0. The caller
decides what ``delta`` a pruned position carries. ``keep=None`` is the dense scan; all-True equals it bit for bit.

``gaps`` ([B, L]) with ``gap_delta`` ([D]) is the same decay-only semantics on a *packed* sequence (ToP-ViM's
``"gapped"`` alignment): the pruned slots are absent, and before each token the state decays as its ``gaps_t``
missing slots would with step ``gap_delta`` and no input. A full-length scan with ``keep`` and ``delta`` such that a
pruned slot's step is ``gap_delta`` gives the same outputs at the kept tokens, in L steps instead of K.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMPLS = ("loop", "parallel", "stepped")


def _check(u, delta, A, B, C, D, z, delta_bias, keep, impl, gaps=None, gap_delta=None) -> None:
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
    if (gaps is None) != (gap_delta is None):
        raise ValueError("gaps: gaps and gap_delta go together")
    if gaps is not None and (gaps.shape != (b, length) or gap_delta.shape != (d,) or keep is not None):
        raise ValueError(f"gaps: expected [B={b}, L={length}] with gap_delta [D={d}] and no keep, got "
                         f"{tuple(gaps.shape)}, {tuple(gap_delta.shape)}")
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


def _doubling(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All prefix states of ``h_t = a_t h_{t-1} + b_t`` (``h_{-1} = 0``) along dim 2, by Hillis-Steele doubling."""
    step = 1
    while step < a.shape[2]:
        # each position absorbs the segment ending `step` earlier; the first `step` positions are already complete
        b = torch.cat([b[:, :, :step], a[:, :, step:] * b[:, :, :-step] + b[:, :, step:]], dim=2)
        a = torch.cat([a[:, :, :step], a[:, :, step:] * a[:, :, :-step]], dim=2)
        step *= 2
    return b


class _ParallelScan(torch.autograd.Function):
    """``y_t = <C_t, h_t>``, ``h_t = dA_t h_{t-1} + dBu_t`` with a hand-written backward.

    Autograd through the doubling steps records every intermediate; here the forward keeps only the states ``h``
    and the backward runs the adjoint recurrence ``lam_t = gy_t C_t + dA_{t+1} lam_{t+1}`` (the same doubling on the
    reversed sequence): ``d dBu_t = lam_t``, ``d dA_t = lam_t h_{t-1}``, ``d C_t = sum_d gy_t h_t``.
    """

    @staticmethod
    def forward(ctx, dA, dBu, C):
        h = _doubling(dA, dBu)
        ctx.save_for_backward(dA, C, h)
        return torch.einsum("bdln,bnl->bdl", h, C)

    @staticmethod
    def backward(ctx, gy):
        dA, C, h = ctx.saved_tensors
        g_h = torch.einsum("bdl,bnl->bdln", gy, C)
        a_next = torch.cat([dA[:, :, 1:], torch.zeros_like(dA[:, :, :1])], dim=2)  # dA_{t+1}, nothing after L - 1
        lam = _doubling(a_next.flip(2), g_h.flip(2)).flip(2)
        h_prev = torch.cat([torch.zeros_like(h[:, :, :1]), h[:, :, :-1]], dim=2)
        return lam * h_prev, lam, torch.einsum("bdl,bdln->bnl", gy, h)


class _SteppedScan(torch.autograd.Function):
    """The selective scan one step at a time, fused: each step forms its decay ``exp(Δ_t A)`` and input
    ``Δ_t u_t B_t`` on a [B, D, N] slice (the [B, D, L, N] tensors of the other paths are never built), and the
    backward is written out: the adjoint ``lam_t = gy_t C_t + exp(Δ_{t+1} A) lam_{t+1}`` walked back from the end,
    with, per step, ``dC_t = sum_d gy_t h_t``, ``dΔ_t = sum_n (lam_t h_{t-1} exp(Δ_t A) A + lam_t u_t B_t)``,
    ``du_t = Δ_t sum_n lam_t B_t``, ``dB_t = sum_d lam_t Δ_t u_t``, ``dA = sum_t lam_t h_{t-1} exp(Δ_t A) Δ_t``.
    Inputs: delta, u [B, D, L] (delta after bias and softplus; u with the keep mask applied), A [D, N],
    B, C [B, N, L]."""

    @staticmethod
    def forward(ctx, delta, u, A, B, C):
        b, d, length = u.shape
        h = u.new_empty(b, d, length, A.shape[1])
        y = u.new_empty(b, d, length)
        state = u.new_zeros(b, d, A.shape[1])
        du = delta * u
        for t in range(length):
            state = torch.addcmul(du[:, :, t, None] * B[:, None, :, t], torch.exp(delta[:, :, t, None] * A), state)
            h[:, :, t] = state
            y[:, :, t] = torch.bmm(state, C[:, :, t, None])[..., 0]
        ctx.save_for_backward(delta, u, A, B, C, h)
        return y

    @staticmethod
    def backward(ctx, gy):
        delta, u, A, B, C, h = ctx.saved_tensors
        length = u.shape[2]
        g_delta, g_u, g_B, g_C = (torch.empty_like(t) for t in (delta, u, B, C))
        g_A = torch.zeros_like(A)
        lam = torch.zeros_like(h[:, :, 0])
        decay_next = None
        for t in range(length - 1, -1, -1):
            lam = gy[:, :, t, None] * C[:, None, :, t] + (decay_next * lam if decay_next is not None else 0.0)
            decay = torch.exp(delta[:, :, t, None] * A)
            g_C[:, :, t] = torch.einsum("bd,bdn->bn", gy[:, :, t], h[:, :, t])
            lam_B = torch.einsum("bdn,bn->bd", lam, B[:, :, t])
            g_decay = lam * h[:, :, t - 1] * decay if t else torch.zeros_like(lam)
            g_delta[:, :, t] = torch.einsum("bdn,dn->bd", g_decay, A) + u[:, :, t] * lam_B
            g_u[:, :, t] = delta[:, :, t] * lam_B
            g_B[:, :, t] = torch.einsum("bdn,bd->bn", lam, delta[:, :, t] * u[:, :, t])
            g_A += torch.einsum("bdn,bd->dn", g_decay, delta[:, :, t])
            decay_next = decay
        return g_delta, g_u, g_A, g_B, g_C


def _scan_parallel(dA: torch.Tensor, dBu: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Same as :func:`_scan_loop`, by Hillis-Steele doubling over L (``ceil(log2 L)`` steps, O(L log L) work), with
    the adjoint recurrence as its backward (:class:`_ParallelScan`)."""
    return _ParallelScan.apply(dA, dBu, C)


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
    gaps: torch.Tensor | None = None,
    gap_delta: torch.Tensor | None = None,
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
        impl: ``"loop"`` (the reference), ``"parallel"`` (Hillis-Steele, the same up to float32 rounding) or
            ``"stepped"`` (the loop on [B, D, N] slices with a hand-written backward).
        gaps: [B, L] the number of pruned slots between each token and the one before it in a packed sequence
            (ToP-ViM's ``"gapped"`` alignment); before token t the state decays by ``exp(gaps_t * gap_delta A)``, as
            ``gaps_t`` slots with step ``gap_delta`` and no input would. None: no slots between the tokens.
        gap_delta: [D] the step size of a pruned slot (after softplus), with ``gaps``.

    Returns:
        y: [B, D, L] in ``u``'s dtype.
    """
    _check(u, delta, A, B, C, D, z, delta_bias, keep, impl, gaps, gap_delta)
    dtype_in = u.dtype
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    # the decay's step: with gaps, exp(g gap_delta A) exp(delta A) = exp((delta + g gap_delta) A); the input keeps delta
    decay = delta if gaps is None else delta + gaps.float()[:, None, :] * gap_delta.float()[:, None]
    if impl == "stepped":
        # a pruned slot only decays the state: zeroing u there removes its input term, exp(delta A) is kept; with
        # gaps the input term decay * B * (u delta / decay) is delta * B * u
        u_in = u if keep is None else torch.where(keep[:, None, :], u, 0.0)
        y = _SteppedScan.apply(decay, u_in if gaps is None else u_in * delta / decay, A, B, C)
    else:
        dA = torch.exp(torch.einsum("bdl,dn->bdln", decay, A))
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
