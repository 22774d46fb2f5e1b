"""Triton gapped selective scan: one program per (batch row, block of channels), sequential over the K kept tokens.

Each program holds the state ``h [BLOCK_D, BLOCK_N]`` in fp32 registers for its channels and walks the kept tokens
in order. At token ``k`` it reads the token's original position, forms the number of pruned slots since the previous
kept token, ``g = p_k - p_{k-1} - 1``, and applies their decay together with the token's own in one exponential,
``exp(A (gap_delta g + Δ_k))``, then the input term ``Δ_k B_k u_k``, the read-out ``<C_k, h> + D u_k`` and the
``silu(z_k)`` gate. The pruned slots cost nothing but that one multiply-add in the exponent.

The loads of token ``k + 1`` (position, ``u``, ``delta``, ``z``, ``B``, ``C``) are issued before token ``k``'s
update, which they do not depend on, so their latency hides behind the exp / multiply-add / reduction chain that
makes each step sequential. Inputs may be fp32, fp16 or bf16 with any strides; every value is converted to fp32
on load, so the interpreter's missing bf16 arithmetic never comes into play. The output is allocated NaN-filled.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prunelab.kernels.dispatch import interpreting


@triton.jit
def _gapped_scan_kernel(
    u_ptr, dt_ptr, z_ptr, b_ptr, c_ptr, pos_ptr, a_ptr, dskip_ptr, bias_ptr, gap_ptr, y_ptr,
    sub, sud, suk,
    stb, std, stk,
    szb, szd, szk,
    sbb, sbn, sbk,
    scb, scn, sck,
    spb, spk,
    syb, syd, syk,
    D, N, K,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < D
    mask_n = offs_n < N
    offs_d64 = offs_d.to(tl.int64)

    # per-channel constants (fp32, contiguous): padded rows/columns get A = 0, i.e. decay 1 on a state that stays 0
    A = tl.load(a_ptr + offs_d64[:, None] * N + offs_n[None, :], mask=mask_d[:, None] & mask_n[None, :], other=0.0)
    gap_dt = tl.load(gap_ptr + offs_d, mask=mask_d, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    if HAS_D:
        dskip = tl.load(dskip_ptr + offs_d, mask=mask_d, other=0.0)

    u_ptrs = u_ptr + pid_b * sub + offs_d64 * sud
    dt_ptrs = dt_ptr + pid_b * stb + offs_d64 * std
    z_ptrs = z_ptr + pid_b * szb + offs_d64 * szd
    b_ptrs = b_ptr + pid_b * sbb + offs_n * sbn
    c_ptrs = c_ptr + pid_b * scb + offs_n * scn
    pos_ptrs = pos_ptr + pid_b * spb
    y_ptrs = y_ptr + pid_b * syb + offs_d64 * syd

    # token 0's inputs; inside the loop, token k + 1's are loaded before token k's update (prefetch). The helpers
    # are written out rather than called: the interpreter re-patches triton.language at every device-function call.
    pos = tl.load(pos_ptrs)
    u = tl.load(u_ptrs, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptrs, mask=mask_d, other=0.0).to(tl.float32)
    z = tl.load(z_ptrs, mask=mask_d, other=0.0).to(tl.float32) if HAS_Z else u
    b = tl.load(b_ptrs, mask=mask_n, other=0.0).to(tl.float32)
    c = tl.load(c_ptrs, mask=mask_n, other=0.0).to(tl.float32)

    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    prev = tl.full([], -1, tl.int64)  # before the first kept token h = 0, so the leading pruned slots change nothing
    for k in range(K):
        # prefetch token k + 1. Past the last token the bounds drop to 0 rather than and-ing a scalar into the
        # masks, which Triton 3.x's interpreter turns into an integer mask it cannot load with.
        nxt = k + 1
        live = nxt < K
        mask_dn = offs_d < tl.where(live, D, 0)
        mask_nn = offs_n < tl.where(live, N, 0)
        pos_n = tl.load(pos_ptrs + nxt * spk, mask=live, other=0)
        u_n = tl.load(u_ptrs + nxt * suk, mask=mask_dn, other=0.0).to(tl.float32)
        dt_n = tl.load(dt_ptrs + nxt * stk, mask=mask_dn, other=0.0).to(tl.float32)
        z_n = tl.load(z_ptrs + nxt * szk, mask=mask_dn, other=0.0).to(tl.float32) if HAS_Z else u_n
        b_n = tl.load(b_ptrs + nxt * sbk, mask=mask_nn, other=0.0).to(tl.float32)
        c_n = tl.load(c_ptrs + nxt * sck, mask=mask_nn, other=0.0).to(tl.float32)

        if HAS_BIAS:
            dt = dt + bias
        if SOFTPLUS:
            # log(1 + e^x) up to x = 20 and x above (torch's and mamba-ssm's threshold); log1p by Goldberg's
            # trick log(w) t / (w - 1), w = 1 + t, which keeps the digits of a tiny Δ that log(1 + t) would lose
            t = tl.exp(tl.minimum(dt, 20.0))
            w = 1.0 + t
            dt = tl.where(dt > 20.0, dt, tl.where(w == 1.0, t, tl.log(w) * (t / tl.where(w == 1.0, 1.0, w - 1.0))))
        gap = (pos - prev - 1).to(tl.float32)
        dA = tl.exp((dt + gap_dt * gap)[:, None] * A)  # g pruned slots of Δ = gap_delta, then the token's own Δ_k
        h = dA * h + (dt * u)[:, None] * b[None, :]
        y = tl.sum(h * c[None, :], axis=1)
        if HAS_D:
            y = y + dskip * u
        if HAS_Z:
            y = y * (z / (1.0 + tl.exp(-z)))  # silu, written out (tl.sigmoid is a device-function call)
        tl.store(y_ptrs + k * syk, y.to(y_ptr.dtype.element_ty), mask=mask_d)
        prev = pos
        pos, u, dt, z, b, c = pos_n, u_n, dt_n, z_n, b_n, c_n


def _launch_config(d: int, n: int) -> tuple[int, int, int]:
    """``(BLOCK_D, BLOCK_N, num_warps)``. Under the interpreter one program per batch row is cheapest; on a GPU a
    small channel block gives B * D / BLOCK_D programs (Vim-S: 8 * 768 / 32 = 192) with a 512-element state."""
    block_n = triton.next_power_of_2(n)
    if interpreting():
        return min(triton.next_power_of_2(d), 256), block_n, 1
    block_d = max(1, min(triton.next_power_of_2(d), 32, 512 // block_n))
    num_warps = max(1, min(8, block_d * block_n // 256))
    return block_d, block_n, num_warps


def gapped_scan_triton(
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
    block_d: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Triton gapped scan; same contract as :func:`gapped_scan_ref` (inputs assumed validated).

    Args:
        u, delta, A, B, C, positions, gap_delta, D, z, delta_bias, delta_softplus: as in :func:`gapped_scan_ref`.
        block_d: channels per program override (a power of two).
        num_warps: warps per program override.

    Returns:
        y: [B, D, K] in ``u``'s dtype, allocated NaN-filled so an unwritten element shows up as NaN.
    """
    bsz, d, k = u.shape
    n = A.shape[1]
    bd, bn, warps = _launch_config(d, n)
    bd, warps = block_d or bd, num_warps or warps
    f32 = dict(dtype=torch.float32, device=u.device)
    A = A.to(**f32).contiguous()
    gap_delta = gap_delta.to(**f32).contiguous()
    dskip = A if D is None else D.to(**f32).contiguous()  # dummy pointers are never read
    bias = A if delta_bias is None else delta_bias.to(**f32).contiguous()
    zz = u if z is None else z
    y = torch.full((bsz, d, k), float("nan"), dtype=u.dtype, device=u.device)
    _gapped_scan_kernel[(bsz, triton.cdiv(d, bd))](
        u, delta, zz, B, C, positions, A, dskip, bias, gap_delta, y,
        *u.stride(), *delta.stride(), *zz.stride(), *B.stride(), *C.stride(), *positions.stride(), *y.stride(),
        d, n, k,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        BLOCK_D=bd, BLOCK_N=bn, num_warps=warps,
    )
    return y
