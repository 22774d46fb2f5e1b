"""Triton implementation of sparse (index-gathered) decode attention; never materialises the gathered K/V.

``_sparse_decode_kernel``: flash-decoding style, one program per (batch * query head, split). It loops over
its part of the head's index list in blocks of ``BLOCK_N``, gathers those K rows straight from the cache
(kv head ``h // group``, any strides), computes the logits as fp32 dot products with the single query, keeps
an online softmax (running max and sum, base 2) and accumulates the gathered V rows. ``-1`` indices are
masked out; a block whose entries are all padding leaves the state unchanged. The decode query is one row,
so the dot products are elementwise multiply + reduce rather than ``tl.dot`` (which needs 16 rows); the op
is memory bound anyway.

With one split (the default when ``B * Hq`` programs fill the GPU, and always under the interpreter) the
program writes the output directly. With ``S > 1`` splits each program writes its unnormalised partial
``(acc, max, sum)`` to a small fp32 scratch and ``_combine_kernel`` (one program per (batch, query head))
merges the ``S`` partials; this keeps small batches (e.g. ``B * Hq = 32``) from idling most of the SMs.

Inputs may be fp32, fp16 or bf16; loads are upcast to fp32 before any arithmetic (also needed under the
Triton interpreter, whose bf16 arithmetic is wrong) and the output is stored in ``q.dtype``. Any ``N``,
``T`` and head dim are supported; the head dim is padded to a power of two inside the kernel.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _sparse_decode_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, o_ptr, part_ptr, ml_ptr,
    sqb, sqh, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sib, sih, sin,
    sob, soh, sod,
    HQ, GROUP, N, D, qk_scale, SPLIT_LEN,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    off_b = (pid_bh // HQ).to(tl.int64)
    off_h = (pid_bh % HQ).to(tl.int64)
    off_kvh = off_h // GROUP
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D

    q = tl.load(q_ptr + off_b * sqb + off_h * sqh + offs_d * sqd, mask=mask_d, other=0.0).to(tl.float32)
    q = q * qk_scale  # fold scale and log2(e) into q: logits come out in base 2
    k_base = k_ptr + off_b * skb + off_kvh * skh
    v_base = v_ptr + off_b * svb + off_kvh * svh
    idx_base = idx_ptr + off_b * sib + off_h * sih

    m_i = tl.full([], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    lo = pid_s * SPLIT_LEN  # this program's slots: [lo, hi), SPLIT_LEN a multiple of BLOCK_N
    hi = tl.minimum(lo + SPLIT_LEN, N)
    for start in range(lo, hi, BLOCK_N):
        slot = start + offs_n
        idx = tl.load(idx_base + slot * sin, mask=slot < hi, other=-1)
        valid = idx >= 0
        kv_mask = valid[:, None] & mask_d[None, :]
        k = tl.load(k_base + idx[:, None] * skt + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all padding so far: avoid -inf - -inf
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe)
        v = tl.load(v_base + idx[:, None] * svt + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new

    if SPLIT:
        row = pid_bh.to(tl.int64) * tl.num_programs(1) + pid_s
        tl.store(part_ptr + row * BLOCK_D + offs_d, acc)
        tl.store(ml_ptr + row * 2, m_i)
        tl.store(ml_ptr + row * 2 + 1, l_i)
    else:
        out = acc / l_i
        tl.store(o_ptr + off_b * sob + off_h * soh + offs_d * sod, out.to(o_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _combine_kernel(
    part_ptr, ml_ptr, o_ptr,
    sob, soh, sod,
    HQ, S, D,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    off_b = (pid_bh // HQ).to(tl.int64)
    off_h = (pid_bh % HQ).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < S
    rows = pid_bh.to(tl.int64) * S + offs_s
    m_s = tl.load(ml_ptr + rows * 2, mask=mask_s, other=float("-inf"))  # all-padding splits: -inf too
    l_s = tl.load(ml_ptr + rows * 2 + 1, mask=mask_s, other=0.0)
    acc = tl.load(part_ptr + rows[:, None] * BLOCK_D + offs_d[None, :], mask=mask_s[:, None], other=0.0)
    m = tl.max(m_s, axis=0)  # finite: every row has a valid index
    w = tl.exp2(m_s - m)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_s * w, axis=0)
    tl.store(o_ptr + off_b * sob + off_h * soh + offs_d * sod, out.to(o_ptr.dtype.element_ty), mask=offs_d < D)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def sparse_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    indices: torch.Tensor,
    scale: float | None = None,
    *,
    block_n: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton forward; same contract as :func:`sparse_decode_attention_ref` (inputs assumed validated).

    Args:
        q: Decode queries, shape ``[B, Hq, d]`` (fp32/fp16/bf16, any strides).
        k_cache: Cached keys, shape ``[B, Hkv, T, d]``, same dtype as ``q``.
        v_cache: Cached values, shape ``[B, Hkv, T, d]``, same dtype as ``q``.
        indices: int64 ``[B, Hq, N]`` positions, ``-1`` = padding; at least one valid entry per row.
        scale: Logit multiplier; ``None`` means ``1 / sqrt(d)``.
        block_n: Index tile size override (power of two, >= 16).
        num_splits: Programs per (batch, query head) over the index list; ``None`` picks 1 under the
            interpreter or when ``B * Hq`` already covers twice the SMs, else enough to do so.

    Returns:
        ``[B, Hq, d]`` in ``q.dtype``, allocated NaN-filled so unwritten elements show up.
    """
    B, HQ, D = q.shape
    HKV = k_cache.shape[1]
    N = indices.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    interp = _interpreting()
    block_d = max(16, triton.next_power_of_2(D))
    bn = block_n or (64 if interp or block_d <= 128 else 32)
    n_blocks = triton.cdiv(N, bn)
    if num_splits is None:
        sms = 1 if interp else torch.cuda.get_device_properties(q.device).multi_processor_count
        num_splits = triton.cdiv(2 * sms, B * HQ)
    split_len = triton.cdiv(n_blocks, max(1, min(num_splits, n_blocks))) * bn
    splits = triton.cdiv(N, split_len)
    out = torch.full((B, HQ, D), float("nan"), dtype=q.dtype, device=q.device)
    part = ml = out  # dummy pointers, never touched when splits == 1
    if splits > 1:
        part = torch.full((B * HQ * splits, block_d), float("nan"), dtype=torch.float32, device=q.device)
        ml = torch.full((B * HQ * splits, 2), float("nan"), dtype=torch.float32, device=q.device)
    _sparse_decode_kernel[(B * HQ, splits)](
        q, k_cache, v_cache, indices, out, part, ml,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *indices.stride(), *out.stride(),
        HQ, HQ // HKV, N, D, float(scale) * _LOG2E, split_len,
        BLOCK_N=bn, BLOCK_D=block_d, SPLIT=splits > 1, num_warps=4,
    )
    if splits > 1:
        _combine_kernel[(B * HQ,)](
            part, ml, out, *out.stride(), HQ, splits, D,
            BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=block_d, num_warps=4,
        )
    return out
