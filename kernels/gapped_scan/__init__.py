"""Gapped selective scan: Mamba's scan over the kept tokens only, keeping the decay of the pruned slots between them.

*ToP-ViM* (Zhan et al., "Exploring Token Pruning in Vision State Space Models", NeurIPS 2024, arXiv 2409.18962)
keeps the slots of pruned tokens in the scan (its pruning-aware hidden-state alignment, Eq. 5-6) so that every
survivor keeps its neighbourhood and decay distances, and gets its speed-up from a scan kernel that skips those
slots; that kernel is not in the official release (``ZLKong/ToP-ViM``). This op is such a scan for the
``"decay_only"`` reading of the alignment (an inferred reading; see ``methods/top_vim/scan.py``): a pruned slot has
no input and an input-independent step size ``gap_delta`` (the caller passes ``softplus(dt_proj.bias)``), so it
needs no projection, only its decay.

Semantics. Inputs are packed over the K kept tokens of each sequence, whose original positions in a sequence of
length L are ``positions [B, K]`` (int64, >= 0, strictly increasing). Per batch row, channel ``d`` and state ``n``,
with ``p_{-1} = -1`` and ``h = 0`` before the first kept token:

    g_k = p_k - p_{k-1} - 1                                 the pruned slots between two kept tokens
    Δ_k = softplus(delta_k + delta_bias)                    (bias / softplus only when given / delta_softplus)
    h   = exp(g_k gap_delta A) h                            the pruned slots: decay only, no input
    h   = exp(Δ_k A) h + Δ_k B_k u_k                        the kept token: mamba-ssm's update
    y_k = <C_k, h> + D u_k,  then y_k * silu(z_k)           read out at the kept tokens only

Pruned slots before the first kept token act on a zero state and change nothing; those after the last are never
read, so L itself is not an argument. This equals a full-length scan over L (mamba-ssm's ``selective_scan_ref``
semantics, :func:`prunelab.methods.top_vim.scan.selective_scan_ref` with ``keep``) in which each pruned slot has
Δ = ``gap_delta`` and zero input, read at the kept positions; with every token kept (``positions = arange(K)``)
it is the dense scan, and with ``gap_delta = 0`` it is the scan of the physically shortened sequence.

What differs from mamba-ssm's ``selective_scan_fn``: only real ``A`` and input-dependent ``B``, ``C`` of shape
``[B, N, K]`` (Vim's case), no ``return_last_state``, forward only (no autograd); ``positions`` and ``gap_delta``
are new. Use :func:`gapped_scan` (dispatch) rather than the implementations directly.
"""

from __future__ import annotations

import torch

from prunelab.kernels.dispatch import DTYPES, check_impl, resolve_impl

from .reference import gapped_scan_ref

__all__ = ["gapped_scan", "gapped_scan_ref", "check_gapped_scan_inputs"]


def _tensor(name: str, t, shape: tuple[int, ...], shape_s: str, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape_s}={list(shape)}, got {list(t.shape)}")
    if t.dtype not in DTYPES:
        raise ValueError(f"{name}: dtype must be one of float32/float16/bfloat16, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: device must match u ({device}), got {t.device}")


def check_gapped_scan_inputs(u, delta, A, B, C, positions, gap_delta, D=None, z=None, delta_bias=None) -> None:
    """Raise ``ValueError`` naming the bad parameter for any input :func:`gapped_scan` rejects."""
    if not isinstance(u, torch.Tensor):
        raise ValueError(f"u: expected a torch.Tensor, got {type(u).__name__}")
    if u.dim() != 3 or 0 in u.shape:
        raise ValueError(f"u: expected shape [B, D, K] with all sizes >= 1, got {list(u.shape)}")
    bsz, d, k = u.shape
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[0] != d or A.shape[1] == 0:
        raise ValueError(f"A: expected shape [D={d}, N] with N >= 1, got {list(getattr(A, 'shape', []))}")
    n = A.shape[1]
    dev = u.device
    _tensor("u", u, (bsz, d, k), "[B, D, K]", dev)
    for name, t in (("delta", delta), ("z", z)):
        if t is None and name == "z":
            continue
        _tensor(name, t, (bsz, d, k), "[B, D, K]", dev)
        if t.dtype != u.dtype:
            raise ValueError(f"{name}: dtype must match u ({u.dtype}), got {t.dtype}")
    _tensor("A", A, (d, n), "[D, N]", dev)
    for name, t in (("B", B), ("C", C)):
        _tensor(name, t, (bsz, n, k), "[B, N, K]", dev)
    for name, t in (("gap_delta", gap_delta), ("D", D), ("delta_bias", delta_bias)):
        if t is not None or name == "gap_delta":
            _tensor(name, t, (d,), "[D]", dev)
    if not isinstance(positions, torch.Tensor):
        raise ValueError(f"positions: expected an int64 torch.Tensor, got {type(positions).__name__}")
    if positions.dtype != torch.int64 or tuple(positions.shape) != (bsz, k):
        raise ValueError(f"positions: expected an int64 tensor of shape [B, K]={[bsz, k]}, got {positions.dtype} "
                         f"{list(positions.shape)}")
    if positions.device != dev:
        raise ValueError(f"positions: device must match u ({dev}), got {positions.device}")
    # the value checks read the tensors back once (one host sync on a GPU); a NaN or negative gap_delta would
    # silently poison or grow every later state of the row
    negative, unordered, bad_gap = torch.stack([
        (positions[:, 0] < 0).any(),
        (positions[:, 1:] <= positions[:, :-1]).any(),
        ~(torch.isfinite(gap_delta) & (gap_delta >= 0)).all(),
    ]).tolist()
    if negative:
        raise ValueError("positions: must be >= 0")
    if unordered:
        raise ValueError("positions: must be strictly increasing along K in every row")
    if bad_gap:
        raise ValueError("gap_delta: must be finite and >= 0 (it is a step size Δ, e.g. softplus(dt_proj.bias))")


def gapped_scan(
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
    impl: str = "auto",
) -> torch.Tensor:
    """Selective scan over the kept tokens, with the decay of the pruned slots between them (module docstring).

    Args:
        u: [B, D, K] inputs at the kept tokens, float32/float16/bfloat16.
        delta: [B, D, K] step sizes at the kept tokens, before ``delta_bias`` and softplus; ``u``'s dtype.
        A: [D, N] the (negative) state matrix diagonal, ``-exp(A_log)``.
        B: [B, N, K] input-dependent input projection at the kept tokens.
        C: [B, N, K] input-dependent output projection at the kept tokens.
        positions: [B, K] int64, the kept tokens' original positions, >= 0 and strictly increasing.
        gap_delta: [D] the Δ every pruned slot applies, used as is (no bias, no softplus), finite and >= 0.
        D: [D] skip connection ``y += D u``, or None.
        z: [B, D, K] gate ``y *= silu(z)``, or None; ``u``'s dtype.
        delta_bias: [D] added to ``delta`` before the softplus, or None.
        delta_softplus: apply softplus to ``delta + delta_bias`` (Vim: True).
        impl: ``"torch"`` (float32 reference, a loop over K), ``"triton"`` (one launch; CPU tensors need
            ``TRITON_INTERPRET=1``), or ``"auto"`` (Triton on CUDA when available, else torch).

    Returns:
        y: [B, D, K] in ``u``'s dtype, computed in float32.

    Raises:
        ValueError: bad ``impl``, shapes, dtypes, devices, positions or gap_delta (the message names the parameter).
        RuntimeError: ``impl="triton"`` but Triton is missing or cannot run on these tensors.
    """
    check_impl(impl)
    check_gapped_scan_inputs(u, delta, A, B, C, positions, gap_delta, D, z, delta_bias)
    kw = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=bool(delta_softplus))
    if resolve_impl(impl, u) == "torch":
        return gapped_scan_ref(u, delta, A, B, C, positions, gap_delta, **kw)
    from .triton import gapped_scan_triton

    return gapped_scan_triton(u, delta, A, B, C, positions, gap_delta, **kw)
