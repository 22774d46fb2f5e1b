"""Triton implementation of the image-query received score; never materialises ``[n_I, S]`` probabilities.

Pass 1 (``_lse_kernel``): one program per (image-query block, batch*query-head) runs an online softmax over
every key its rows can see (valid, and ``j <= i`` when causal; the key loop stops after the block's last row
when causal) and writes the log-sum-exp of each image query (base 2), ``[B*Hq, n_max]``.

Pass 2 (``_score_kernel``): one program per (image-column block, batch*query-head) holds its key block, loops
over the image queries that can see it (when causal, only those from the block's first column on),
recomputes ``P = exp2(s - lse)`` and sums over queries. Each program owns its columns, so there are no
atomics and the result is deterministic. Columns past a sample's span are written as 0. The per-head sums
``[B, Hq, n_max]`` are then reduced over heads in torch (a few hundred kilobytes at LLaVA-NeXT shapes).

The method is VisionDrop's LLM-stage score ("Rethinking Visual Token Reduction in LVLMs under Cross-modal
Misalignment", arXiv 2506.22283). Inputs may be fp32, fp16 or bf16 with any strides; accumulation is fp32,
and fp32 inputs use IEEE dots (no TF32). Under ``TRITON_INTERPRET=1`` bf16 operands are upcast to fp32
before each dot, because the interpreter cannot multiply bf16.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from prunelab.kernels.dispatch import attention_tiles

_LOG2E = 1.4426950408889634


@triton.jit
def _lse_kernel(
    q_ptr, k_ptr, valid_ptr, start_ptr, end_ptr, lse_ptr,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svn,
    HQ, GROUP, S, D, N_MAX, qk_scale,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // HQ).to(tl.int64)
    off_h = (pid_bh % HQ).to(tl.int64)
    off_kh = off_h // GROUP
    s0 = tl.load(start_ptr + off_b)
    n_img = tl.load(end_ptr + off_b) - s0
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = local < n_img
    rows = s0 + local  # absolute row of each image query
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D

    q_ptrs = q_ptr + off_b * sqb + off_h * sqh + rows[:, None] * sqn + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + off_b * skb + off_kh * skh
    v_base = valid_ptr + off_b * svb

    # keys to visit: all of them, or (causal) up to the block's last image row; none for an empty block
    last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, n_img)
    hi = tl.where(last > pid_m * BLOCK_M, S, 0)
    if CAUSAL:
        hi = tl.minimum(hi, s0 + last)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        in_seq = cols < S
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :] * skd,
                    mask=in_seq[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        kval = tl.load(v_base + cols * svn, mask=in_seq, other=0) != 0
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # base-2 logits
        vis = (in_seq & kval)[None, :] & mask_m[:, None]
        if CAUSAL:
            vis = vis & (cols[None, :] <= rows[:, None])
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet (left padding)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new

    l_safe = tl.where(mask_m, l_i, 1.0)  # rows past the span see nothing and are not stored
    tl.store(lse_ptr + pid_bh.to(tl.int64) * N_MAX + local, m_i + tl.log2(l_safe), mask=mask_m)


@triton.jit
def _score_kernel(
    q_ptr, k_ptr, valid_ptr, start_ptr, end_ptr, lse_ptr, out_ptr,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svn,
    HQ, GROUP, D, N_MAX, qk_scale,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // HQ).to(tl.int64)
    off_h = (pid_bh % HQ).to(tl.int64)
    off_kh = off_h // GROUP
    s0 = tl.load(start_ptr + off_b)
    n_img = tl.load(end_ptr + off_b) - s0
    first_col = pid_n * BLOCK_N
    local_n = first_col + tl.arange(0, BLOCK_N)
    cols = s0 + local_n
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    kval = tl.load(valid_ptr + off_b * svb + cols * svn, mask=local_n < n_img, other=0) != 0
    mask_n = (local_n < n_img) & kval

    k_ptrs = k_ptr + off_b * skb + off_kh * skh + cols[:, None] * skn + offs_d[None, :] * skd
    k = tl.load(k_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    kt = tl.trans(k)
    q_base = q_ptr + off_b * sqb + off_h * sqh
    lse_base = lse_ptr + pid_bh.to(tl.int64) * N_MAX

    # queries that can see these columns: all image rows, or (causal) those from the first column on
    lo = 0
    if CAUSAL:
        lo = first_col
    hi = tl.where(first_col < n_img, n_img, 0)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_m in range(lo, hi, BLOCK_M):
        local_m = start_m + offs_m
        mask_m = local_m < n_img
        q = tl.load(q_base + (s0 + local_m)[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        lse = tl.load(lse_base + local_m, mask=mask_m, other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        vis = mask_m[:, None] & mask_n[None, :]
        if CAUSAL:
            vis = vis & (local_n[None, :] <= local_m[:, None])
        p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
        acc += tl.sum(p, axis=0)
    tl.store(out_ptr + pid_bh.to(tl.int64) * N_MAX + local_n, acc, mask=local_n < N_MAX)


def image_query_received_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    valid: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    scale: float | None = None,
    causal: bool = True,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Triton path; same contract as :func:`image_query_received_ref` (inputs assumed validated).

    Args:
        q: Queries ``[B, Hq, S, d]`` (fp32/fp16/bf16, any strides).
        k: Keys ``[B, Hkv, S, d]``, same dtype as ``q``.
        valid: Bool ``[B, S]`` key validity.
        start: Int64 ``[B]`` first image row; ``end``: int64 ``[B]`` one past the last.
        scale: Logit multiplier; ``None`` means ``1 / sqrt(d)``.
        causal: Apply the causal mask ``j <= i``.
        block_m: Query tile size override (power of two, >= 16).
        block_n: Key tile size override (power of two, >= 16).

    Returns:
        Float32 ``[B, n_max]``. The log-sum-exp scratch and the per-head sums are allocated NaN-filled, so
        any element the kernels fail to write shows up as NaN in the result.
    """
    B, hq, S, d = q.shape
    group = hq // k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    start = start.to(torch.int64).contiguous()
    end = end.to(torch.int64).contiguous()
    n = end - start
    n_max = int(n.max().item())
    tiles = attention_tiles(d, q.dtype, block_m, block_n)
    bm, bn = tiles["BLOCK_M"], tiles["BLOCK_N"]
    qk_scale = float(scale) * _LOG2E
    valid_u8 = valid.view(torch.uint8) if valid.dtype == torch.bool else valid.to(torch.uint8)

    lse = torch.full((B * hq, n_max), float("nan"), dtype=torch.float32, device=q.device)
    per_head = torch.full((B, hq, n_max), float("nan"), dtype=torch.float32, device=q.device)
    common = dict(CAUSAL=bool(causal), **tiles)
    _lse_kernel[(triton.cdiv(n_max, bm), B * hq)](
        q, k, valid_u8, start, end, lse,
        *q.stride(), *k.stride(), *valid_u8.stride(),
        hq, group, S, d, n_max, qk_scale, **common,
    )
    _score_kernel[(triton.cdiv(n_max, bn), B * hq)](
        q, k, valid_u8, start, end, lse, per_head,
        *q.stride(), *k.stride(), *valid_u8.stride(),
        hq, group, d, n_max, qk_scale, **common,
    )
    return per_head.sum(dim=1) / (hq * n.to(torch.float32))[:, None]
