"""Triton implementation of FASA partial-dim scoring plus an exact top-N radix select.

Pass 1 (``_score_kernel``): one program per (T block, batch*query head) gathers the ``m`` dominant dims of
``q`` and of a ``[BLOCK_T, m]`` tile of keys (kv head ``h // group``; masked loads, any strides), computes
fp32 partial scores and writes them to a scratch buffer ``[B, Hq, T]`` (positions ``>= lengths[b]`` get
``-inf``; ``-0.0`` is written as ``+0.0`` so equal scores have equal keys).

Pass 2 (``_select_kernel``): one program per (batch, query head) row finds the exact ``N_b``-th largest
score with a 4-pass, 8-bit radix select over order-preserving uint32 keys of the fp32 scores (each pass
streams the row once and builds a 256-bin histogram of the keys that match the prefix found so far). A fifth
pass streams the row in position order and writes every position above that threshold plus, among the
positions equal to it, the lowest ones until ``N_b`` are written. Because positions are visited in order,
the output is already sorted ascending; no sort is needed, in Triton or in torch. The kernel then fills the
slots ``[N_b, N)`` with ``-1``. Each select program streams its row of ``4 * T`` bytes five times (mostly
from L2); with only ``B * Hq`` programs this pass underfills the GPU when ``B * Hq`` is small.

Supported sizes: any ``T < 2**31``, any budget ``N >= 1`` (``N > T`` included) and any ``m``, head dim and
strides; memory beyond the inputs is the fp32 score scratch (``4 * B * Hq * T`` bytes). Inputs may be fp32,
fp16 or bf16; all arithmetic is fp32 (loads are upcast before use, which also keeps the Triton
interpreter's broken bf16 arithmetic out of the way). Scores are assumed finite (a NaN ranks above +inf).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _score_kernel(
    q_ptr, k_ptr, dims_ptr, len_ptr, s_ptr,
    sqb, sqh, sqd,
    skb, skh, skt, skd,
    sdh, sdm,
    HQ, GROUP, T, M,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // HQ).to(tl.int64)
    off_h = (pid_bh % HQ).to(tl.int64)
    off_kvh = off_h // GROUP
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_m = tl.arange(0, BLOCK_M)
    mask_t = offs_t < T
    mask_m = offs_m < M

    dims = tl.load(dims_ptr + off_h * sdh + offs_m * sdm, mask=mask_m, other=0)
    q = tl.load(q_ptr + off_b * sqb + off_h * sqh + dims * sqd, mask=mask_m, other=0.0).to(tl.float32)
    k_ptrs = k_ptr + off_b * skb + off_kvh * skh + offs_t[:, None].to(tl.int64) * skt + dims[None, :] * skd
    k = tl.load(k_ptrs, mask=mask_t[:, None] & mask_m[None, :], other=0.0).to(tl.float32)
    s = tl.sum(k * q[None, :], axis=1)
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 -> +0.0
    length = tl.load(len_ptr + off_b)
    s = tl.where(offs_t < length, s, float("-inf"))
    tl.store(s_ptr + pid_bh.to(tl.int64) * T + offs_t, s, mask=mask_t)


@triton.jit
def _sortable_key(s):
    """Map fp32 to uint32 so that unsigned integer order equals float order."""
    bits = s.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)


@triton.jit
def _select_kernel(
    s_ptr, len_ptr, idx_ptr,
    sib, sih, sin,
    HQ, T, N,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    off_b = (pid_bh // HQ).to(tl.int64)
    off_h = (pid_bh % HQ).to(tl.int64)
    row = s_ptr + pid_bh.to(tl.int64) * T
    length = tl.load(len_ptr + off_b).to(tl.int32)
    n_keep = tl.minimum(length, N)  # N_b
    offs = tl.arange(0, BLOCK_T)
    bins = tl.arange(0, 256)

    # Radix select, 8 bits per pass from the top: find the key of the n_keep-th largest valid score.
    prefix = tl.zeros([], dtype=tl.uint32)  # high bits of the threshold key found so far
    k_rem = n_keep  # rank of the threshold among the keys that match the prefix
    for p in tl.static_range(4):
        shift = 24 - 8 * p  # constexpr: the loop is unrolled
        hist = tl.zeros([256], dtype=tl.int32)
        for start in range(0, length, BLOCK_T):
            pos = start + offs
            valid = pos < length
            key = _sortable_key(tl.load(row + pos, mask=valid, other=0.0))
            match = valid & (((key >> shift) >> 8) == prefix)
            hist += tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=match)
        ge = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # keys with digit >= bin
        digit = tl.sum((ge >= k_rem).to(tl.int32), axis=0) - 1  # ge is non-increasing: last bin still >= k_rem
        k_rem -= tl.sum(tl.where(bins > digit, hist, 0), axis=0)
        prefix = (prefix << 8) | digit.to(tl.uint32)

    # Emit, in position order: every key > threshold, and the first k_rem keys == threshold.
    out = idx_ptr + off_b * sib + off_h * sih
    n_out = tl.zeros([], dtype=tl.int32)
    n_eq = tl.zeros([], dtype=tl.int32)
    for start in range(0, length, BLOCK_T):
        pos = start + offs
        valid = pos < length
        key = _sortable_key(tl.load(row + pos, mask=valid, other=0.0))
        eq = valid & (key == prefix)
        take = (valid & (key > prefix)) | (eq & (n_eq + tl.cumsum(eq.to(tl.int32), axis=0) <= k_rem))
        slot = n_out + tl.cumsum(take.to(tl.int32), axis=0) - 1
        tl.store(out + slot.to(tl.int64) * sin, pos.to(tl.int64), mask=take)
        n_out += tl.sum(take.to(tl.int32), axis=0)
        n_eq += tl.sum(eq.to(tl.int32), axis=0)

    # Slots [n_keep, N) are padding.
    offs_n = tl.arange(0, BLOCK_N)
    for start in range((n_keep // BLOCK_N) * BLOCK_N, N, BLOCK_N):
        slot = start + offs_n
        fill = (slot >= n_keep) & (slot < N)
        tl.store(out + slot.to(tl.int64) * sin, tl.full([BLOCK_N], -1, tl.int64), mask=fill)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def partial_score_topk_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    dims: torch.Tensor,
    budget: int,
    lengths: torch.Tensor | None = None,
    *,
    block_t: int | None = None,
    return_scores: bool = False,
):
    """Triton scoring + selection; same contract as :func:`partial_score_topk_ref` (inputs assumed validated).

    Args:
        q: Decode queries, shape ``[B, Hq, d]`` (fp32/fp16/bf16, any strides).
        k_cache: Cached keys, shape ``[B, Hkv, T, d]``, same dtype as ``q``.
        dims: int64 ``[Hq, m]`` dominant dims per query head.
        budget: ``N >= 1``.
        lengths: int64 ``[B]`` valid lengths, or ``None`` for ``T``.
        block_t: Position tile size override for both passes (power of two, >= 16).
        return_scores: Also return the fp32 score scratch ``[B, Hq, T]`` (``-inf`` beyond each length).

    Returns:
        int64 ``[B, Hq, budget]`` indices (sorted ascending, ``-1`` padded), or ``(indices, scores)``. Indices
        are allocated filled with ``-2`` and scores with NaN, so anything the kernels fail to write shows up.
    """
    B, HQ, D = q.shape
    HKV, T = k_cache.shape[1], k_cache.shape[2]
    M = dims.shape[1]
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.int64, device=q.device)
    lengths = lengths.contiguous()
    interp = _interpreting()
    # Scoring tiles are [BLOCK_T, m]; the select streams 1-D tiles and can afford longer ones.
    bt_score, bt_select = (256, 256) if interp else (128, 1024)
    if block_t is not None:
        bt_score = bt_select = block_t
    block_m = max(16, triton.next_power_of_2(M))

    scores = torch.full((B, HQ, T), float("nan"), dtype=torch.float32, device=q.device)
    indices = torch.full((B, HQ, budget), -2, dtype=torch.int64, device=q.device)
    _score_kernel[(triton.cdiv(T, bt_score), B * HQ)](
        q, k_cache, dims, lengths, scores,
        *q.stride(), *k_cache.stride(), *dims.stride(),
        HQ, HQ // HKV, T, M,
        BLOCK_T=bt_score, BLOCK_M=block_m, num_warps=4,
    )
    _select_kernel[(B * HQ,)](
        scores, lengths, indices,
        *indices.stride(),
        HQ, T, budget,
        BLOCK_T=bt_select, BLOCK_N=256, num_warps=4 if interp else 8,
    )
    return (indices, scores) if return_scores else indices
