"""Triton implementation of attention with per-key received mass; never materialises ``[Nq, Nk]``.

Pass 1 (``_fwd_kernel``): flash-attention forward with an online softmax, one program per (query block,
batch*head); writes ``out`` and the per-query log-sum-exp (kept in base 2 internally).

Pass 2 (``_received_kernel``): one program per (key block, batch*head) loops over all query blocks,
recomputes the logits, ``P = exp(s - lse)``, weights rows by ``w`` and reduces over queries. Each program
owns its key block, so no atomics are needed and the result is deterministic.

Inputs may be fp32, fp16 or bf16; all accumulation is fp32. fp32 inputs use IEEE dots (no TF32) so they
match the reference tightly. Under ``TRITON_INTERPRET=1`` bf16 operands are upcast to fp32 before each dot,
because the interpreter cannot multiply bf16.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from prunelab.kernels.dispatch import attention_tiles

_LOG2E = 1.4426950408889634


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    H, NQ, NK, D, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < NQ
    mask_d = offs_d < D

    q_ptrs = q_ptr + off_b * sqb + off_h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + off_b * skb + off_h * skh
    v_base = v_ptr + off_b * svb + off_h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < NK
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # base-2 logits
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = o_ptr + off_b * sob + off_h * soh + offs_m[:, None] * son + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(lse_ptr + pid_bh.to(tl.int64) * NQ + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _received_kernel(
    q_ptr, k_ptr, lse_ptr, w_ptr, r_ptr,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    swb, swh, swn,
    H, NQ, NK, D, qk_scale,
    HAS_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < NK
    mask_d = offs_d < D

    k_ptrs = k_ptr + off_b * skb + off_h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd
    k = tl.load(k_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    kt = tl.trans(k)
    q_base = q_ptr + off_b * sqb + off_h * sqh
    lse_base = lse_ptr + pid_bh.to(tl.int64) * NQ
    w_base = w_ptr + off_b * swb + off_h * swh

    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_m in range(0, NQ, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < NQ
        q = tl.load(q_base + rows[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        lse = tl.load(lse_base + rows, mask=mask_m, other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if HAS_W:
            w = tl.load(w_base + rows * swn, mask=mask_m, other=0.0).to(tl.float32)
        else:
            w = tl.where(mask_m, 1.0, 0.0)
        p = tl.where(mask_m[:, None], p * w[:, None], 0.0)
        acc += tl.sum(p, axis=0)
    tl.store(r_ptr + pid_bh.to(tl.int64) * NK + offs_n, acc, mask=mask_n)


def attention_received_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    query_weights: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward; same contract as :func:`attention_received_ref` (inputs assumed validated).

    Args:
        q: Queries, shape ``[B, H, Nq, D]`` (fp32/fp16/bf16, any strides).
        k: Keys, shape ``[B, H, Nk, D]``, same dtype as ``q``.
        v: Values, shape ``[B, H, Nk, D]``, same dtype as ``q``.
        scale: Logit multiplier; ``None`` means ``1 / sqrt(D)``.
        query_weights: ``[B, Nq]`` or ``[B, H, Nq]`` weights, or ``None`` for all ones.
        block_m: Query tile size override (power of two, >= 16).
        block_n: Key tile size override (power of two, >= 16).

    Returns:
        ``(out [B, H, Nq, D] in q.dtype, received [B, H, Nk] float32)``. Both are allocated NaN-filled, so
        any element the kernels fail to write shows up as NaN.
    """
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    tiles = attention_tiles(D, q.dtype, block_m, block_n)
    bm, bn = tiles["BLOCK_M"], tiles["BLOCK_N"]
    qk_scale = float(scale) * _LOG2E

    out = torch.full((B, H, NQ, D), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((B, H, NQ), float("nan"), dtype=torch.float32, device=q.device)
    received = torch.full((B, H, NK), float("nan"), dtype=torch.float32, device=q.device)

    _fwd_kernel[(triton.cdiv(NQ, bm), B * H)](
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, NQ, NK, D, qk_scale, **tiles,
    )

    if query_weights is None:
        w, sw = lse, (0, 0, 0)  # dummy pointer, never read
    else:
        w = query_weights
        sw = (w.stride(0), 0, w.stride(1)) if w.dim() == 2 else tuple(w.stride())
    _received_kernel[(triton.cdiv(NK, bn), B * H)](
        q, k, lse, w, received,
        *q.stride(), *k.stride(), *sw,
        H, NQ, NK, D, qk_scale,
        HAS_W=query_weights is not None, **tiles,
    )
    return out, received
