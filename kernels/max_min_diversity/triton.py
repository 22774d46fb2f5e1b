"""Triton greedy max-min diversity selection: one launch, one program per batch element, all ``k`` steps.

Design. The kernel reads the precomputed float32 cosine-distance matrix ``Dist [B, M, M]`` rather than
recomputing distances from the normalised tokens on the fly:

* DivPrune's first pick needs every token's nearest-neighbour distance, i.e. the whole ``M x M x C``
  product, which the dispatch gets from one batched cuBLAS matmul at close to peak. Recomputing a row of
  ``Dist`` inside the loop would re-read all ``M x C`` tokens at every one of the ``k`` steps (at M = 2880,
  C = 4096, k = 320 that is 7.5 GB of fp16 traffic through a single SM) instead of ``k`` rows of
  ``4 M`` bytes (3.7 MB, mostly L2 hits).
* Each greedy step depends on the previous argmax, so the loop is a chain of latency-bound row loads and
  block reductions; one program per batch element keeps the running-min vector ``m`` (``BLOCK_M`` fp32, at
  most 16384) in registers for all ``k`` steps, with no launch per step and no grid-wide synchronisation.

Program ``b``: (1) streams ``Dist[b]`` once in ``[BLOCK_R, BLOCK_C]`` tiles to find the column-wise
nearest-neighbour distance (diagonal and invalid rows excluded) and its argmax, keeping the lowest index
among equal maxima; (2) loads row ``Dist[b, s_0]`` into ``m``, then ``k - 1`` times takes the argmax of ``m``
(``tie_break_left``), stores it, and folds in that token's row with ``minimum``. Chosen and invalid tokens
hold ``-inf``. Every operation is a load, compare, min or max on fp32, so the picks and scores equal the
torch reference bit for bit on the same ``Dist``.

Inputs of any float dtype reach this kernel only as fp32 distances, so all math is fp32 and the Triton
interpreter's broken bf16 arithmetic never comes into play.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_M = 16384  # the running-min vector lives in registers: 16384 fp32 over 16 warps = 32 per thread


@triton.jit
def _greedy_kernel(
    d_ptr, valid_ptr, order_ptr, score_ptr,
    sdb, sdi, sdj,
    svb, svm,
    sob, sok,
    ssb, ssk,
    M, K,
    HAS_VALID: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    d_base = d_ptr + b * sdb

    # (1) first pick, DivPrune step 2: argmax_j min_{i != j, i valid} Dist[i, j]
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], 0, tl.int32)
    for c0 in range(0, M, BLOCK_C):
        cols = c0 + offs_c
        col_ok = cols < M
        if HAS_VALID:
            col_ok = col_ok & (tl.load(valid_ptr + b * svb + cols * svm, mask=cols < M, other=0) != 0)
        colmin = tl.full([BLOCK_C], float("inf"), tl.float32)
        for r0 in range(0, M, BLOCK_R):
            rows = r0 + offs_r
            row_ok = rows < M
            if HAS_VALID:
                row_ok = row_ok & (tl.load(valid_ptr + b * svb + rows * svm, mask=rows < M, other=0) != 0)
            ptrs = d_base + rows[:, None].to(tl.int64) * sdi + cols[None, :] * sdj
            tile = tl.load(ptrs, mask=row_ok[:, None] & (cols < M)[None, :], other=float("inf"))
            tile = tl.where(rows[:, None] == cols[None, :], float("inf"), tile)  # not its own neighbour
            colmin = tl.minimum(colmin, tl.min(tile, axis=0))
        colmin = tl.where(col_ok, colmin, float("-inf"))
        cmax = tl.max(colmin, axis=0)
        cidx = tl.argmax(colmin, axis=0, tie_break_left=True) + c0
        # strictly greater: an equal maximum in a later chunk has a higher index and loses the tie
        best_idx = tl.where(cmax > best, cidx, best_idx)
        best = tl.maximum(best, cmax)
    tl.store(order_ptr + b * sob, best_idx.to(tl.int64))
    tl.store(score_ptr + b * ssb, best)

    # (2) greedy steps, DivPrune step 3: s_t = argmax_{j not in S} min_{s in S} Dist[s, j]
    offs = tl.arange(0, BLOCK_M)
    ok = offs < M
    if HAS_VALID:
        ok = ok & (tl.load(valid_ptr + b * svb + offs * svm, mask=offs < M, other=0) != 0)
    m = tl.load(d_base + best_idx.to(tl.int64) * sdi + offs * sdj, mask=offs < M, other=float("-inf"))
    m = tl.where(ok & (offs != best_idx), m, float("-inf"))
    for t in range(1, K):
        j = tl.argmax(m, axis=0, tie_break_left=True)
        tl.store(order_ptr + b * sob + t * sok, j.to(tl.int64))
        tl.store(score_ptr + b * ssb + t * ssk, tl.max(m, axis=0))
        row = tl.load(d_base + j.to(tl.int64) * sdi + offs * sdj, mask=offs < M, other=float("-inf"))
        m = tl.where(offs == j, float("-inf"), tl.minimum(m, row))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def greedy_max_min_triton(
    dist: torch.Tensor,
    k: int,
    valid: torch.Tensor | None = None,
    *,
    block_r: int | None = None,
    block_c: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton greedy selection; same contract as :func:`.reference.greedy_max_min_ref` (inputs validated).

    Args:
        dist: Distances, shape ``[B, M, M]`` float32 (any strides), ``M <= MAX_M``.
        k: Tokens to pick, at most the valid count of every row.
        valid: Optional bool mask ``[B, M]``.
        block_r: Row-tile override for the nearest-neighbour pass (power of two).
        block_c: Column-tile override for the nearest-neighbour pass (power of two).

    Returns:
        ``(order [B, k] int64, score [B, k] float32)``, allocated as ``-1`` and NaN so that any element the
        kernel fails to write shows up in tests.
    """
    B, M, _ = dist.shape
    if dist.dtype != torch.float32:
        raise ValueError(f"dist: expected float32 distances, got {dist.dtype}")
    if M > MAX_M:
        raise ValueError(f"x: the Triton path holds M <= {MAX_M} tokens in registers, got M={M}; use impl='torch'")
    block_m = max(16, triton.next_power_of_2(M))
    if _interpreting():  # few large tiles: the interpreter's cost is per operation, not per element
        br, bc, warps = 64, block_m, 1
    else:
        br, bc = 32, min(block_m, 256)
        warps = 4 if block_m <= 1024 else (8 if block_m <= 4096 else 16)
    br, bc = block_r or br, block_c or bc

    order = torch.full((B, k), -1, dtype=torch.int64, device=dist.device)
    score = torch.full((B, k), float("nan"), dtype=torch.float32, device=dist.device)
    if valid is None:
        v, sv = order, (0, 0)  # dummy pointer, never read
    else:
        v = valid.to(torch.uint8)
        sv = v.stride()
    _greedy_kernel[(B,)](
        dist, v, order, score,
        *dist.stride(), *sv, *order.stride(), *score.stride(),
        M, k,
        HAS_VALID=valid is not None,
        BLOCK_M=block_m, BLOCK_R=br, BLOCK_C=bc,
        num_warps=warps,
    )
    return order, score
