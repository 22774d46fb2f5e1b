"""Tests for prunelab.kernels.max_min_diversity: reference properties, Triton vs reference, dispatch.

Triton runs under ``TRITON_INTERPRET=1`` here (tests/conftest.py sets it when CUDA is absent), so shapes are
small and odd. Both paths read the same float32 distance matrix and do only loads, compares, ``min`` and
``argmax``, so picks and scores must agree exactly (``atol=0``) for every input dtype. The Triton wrapper
allocates ``order`` as -1 and ``score`` as NaN, so any element the kernel fails to write fails the test.
"""

from __future__ import annotations

import pytest
import torch

import prunelab.kernels.max_min_diversity as mmd_mod
from prunelab.kernels import dispatch
from prunelab.kernels.max_min_diversity import (
    cosine_distance_ref,
    greedy_max_min_ref,
    max_min_diversity_order,
)

HAS_TRITON = dispatch.triton_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")


def _x(b, m, c, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(b, m, c, generator=g).to(device=device, dtype=dtype)


def _valid(b, m, seed=1, device="cpu"):
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.rand(b, m, generator=g) > 0.3
    v[0] = True  # one full row beside a ragged one
    return v.to(device)


def _check_exact(order, score, ref_order, ref_score, m, valid=None):
    assert order.dtype == torch.int64 and score.dtype == torch.float32
    assert (order >= 0).all() and (order < m).all(), "unwritten (-1) or out-of-range picks"
    assert not torch.isnan(score).any(), "unwritten (NaN) scores"
    assert torch.equal(order, ref_order)
    assert torch.equal(score, ref_score)  # exact: min/argmax on the same fp32 distances
    assert all(row.unique().numel() == row.numel() for row in order)
    if valid is not None:
        assert valid.gather(1, order).all()


# ----------------------------------------------------------------------------------------------------------
# Reference properties
# ----------------------------------------------------------------------------------------------------------


def test_ref_running_min_equals_rereduction():
    # the O(kM) running min against the O(k^2 M) form that re-reduces over every chosen row each step
    x = _x(2, 70, 24)
    dist = cosine_distance_ref(x)
    order, score = greedy_max_min_ref(dist, 25)
    for b in range(2):
        for t in range(1, 25):
            md = dist[b, order[b, :t]].amin(dim=0)
            md[order[b, :t]] = float("-inf")
            assert int(md.argmax()) == order[b, t] and md.max() == score[b, t]


def test_ref_cpu_row_loop_equals_batched_loop():
    # the CPU fast path (python-int indices, one row at a time) against the batched loop GPUs run
    from prunelab.kernels.max_min_diversity.reference import _greedy_batched, _greedy_rows_cpu, first_pick_ref

    x, valid = _x(3, 90, 16), _valid(3, 90)
    for v in (None, valid):
        dist = cosine_distance_ref(x)
        outs = []
        for loop in (_greedy_rows_cpu, _greedy_batched):
            order, score = torch.empty(3, 40, dtype=torch.int64), torch.empty(3, 40)
            order[:, 0], score[:, 0] = first_pick_ref(dist, v)
            outs.append(loop(dist, order, score, v))
        _check_exact(*outs[0], *outs[1], 90, v)


def test_unit_rows_checks_finiteness_on_the_norms():
    from prunelab.kernels.max_min_diversity import unit_rows

    x = _x(2, 5, 8)
    x[1, 2] *= 1e30  # finite, but its squared norm overflows float32: rescaled, not flushed to zero
    n = unit_rows(x)
    big = x[1, 2].double()
    assert torch.allclose(n.norm(dim=-1), torch.ones(2, 5)) and torch.allclose(n[1, 2], (big / big.norm()).float())
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x: contains NaN or inf"):
        max_min_diversity_order(x, 2)
    x[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="x: contains NaN or inf"):
        max_min_diversity_order(x, 2)


def test_ref_keep_all_is_permutation():
    order, _ = greedy_max_min_ref(cosine_distance_ref(_x(2, 33, 8)), 33)
    assert torch.equal(order.sort(dim=-1).values, torch.arange(33).expand(2, 33))


def test_ref_ties_go_to_lower_index():
    # four identical tokens: every distance ties, so the picks are 0, 1, 2, 3 in that order
    x = torch.ones(1, 4, 8)
    order, score = greedy_max_min_ref(cosine_distance_ref(x), 4)
    assert order.tolist() == [[0, 1, 2, 3]]
    assert torch.isfinite(score).all()


# ----------------------------------------------------------------------------------------------------------
# Triton (interpreter on CPU) vs reference
# ----------------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,c", [(63, 9, 40), (197, 13, 64), (577, 23, 32)])
def test_triton_matches_ref(m, k, c, dtype):
    x = _x(2, m, c, dtype)
    ref = max_min_diversity_order(x, k, impl="torch")
    _check_exact(*max_min_diversity_order(x, k, impl="triton"), *ref, m)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,c", [(63, 11, 48), (197, 5, 33)])
def test_triton_valid_mask(m, k, c, dtype):
    x, valid = _x(2, m, c, dtype), _valid(2, m)
    ref = max_min_diversity_order(x, k, valid=valid, impl="torch")
    _check_exact(*max_min_diversity_order(x, k, valid=valid, impl="triton"), *ref, m, valid)


@needs_triton
def test_triton_keep_all():
    x = _x(2, 63, 32, torch.float16)
    order, score = max_min_diversity_order(x, 63, impl="triton")
    _check_exact(order, score, *max_min_diversity_order(x, 63, impl="torch"), 63)
    assert torch.equal(order.sort(dim=-1).values, torch.arange(63).expand(2, 63))


@needs_triton
def test_triton_small_tiles_and_ties():
    # exact duplicates make equal maxima across several column chunks of the nearest-neighbour pass: the
    # lower index must win there and in every greedy step
    from prunelab.kernels.max_min_diversity.triton import greedy_max_min_triton

    x = _x(2, 45, 16)
    x[:, 30:] = x[:, 3:18]  # tokens 30..44 duplicate tokens 3..17
    x[1, [5, 20, 40]] = 0.0  # zero rows, one per 16-column chunk: nearest-neighbour distance exactly 1
    valid = _valid(2, 45, seed=2)
    dist = cosine_distance_ref(x)
    assert (dist[1] + torch.eye(45) * 9).amin(dim=0).max() == 1.0  # the three zero rows tie for first
    for v in (None, valid):
        ref = greedy_max_min_ref(dist, 40 if v is None else 20, v)
        out = greedy_max_min_triton(dist, 40 if v is None else 20, v, block_r=16, block_c=16)
        _check_exact(*out, *ref, 45, v)
        if v is None:
            assert out[0][1, 0] == 5  # lowest of the three, though each sits in its own chunk


@needs_triton
def test_triton_single_valid_token_and_strided_dist():
    from prunelab.kernels.max_min_diversity.triton import greedy_max_min_triton

    x = _x(2, 21, 8)
    valid = torch.zeros(2, 21, dtype=torch.bool)
    valid[0, 7] = True
    valid[1, 3:9] = True
    dist = cosine_distance_ref(x).transpose(-1, -2).contiguous().transpose(-1, -2)  # column-major views
    order, score = greedy_max_min_triton(dist, 1, valid)
    ref_order, ref_score = greedy_max_min_ref(dist, 1, valid)
    _check_exact(order, score, ref_order, ref_score, 21, valid)
    assert order[0, 0] == 7 and score[0, 0] == float("inf")  # no valid neighbour


# ----------------------------------------------------------------------------------------------------------
# Dispatch and validation
# ----------------------------------------------------------------------------------------------------------


def test_dispatch_auto_on_cpu_picks_torch(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return greedy_max_min_ref(*args, **kwargs)

    monkeypatch.setattr(mmd_mod, "greedy_max_min_ref", spy)
    max_min_diversity_order(_x(1, 9, 8), 3, impl="auto")
    assert calls == [1]


def test_dispatch_triton_missing(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="triton"):
        max_min_diversity_order(_x(1, 9, 8), 3, impl="triton")


@needs_triton
def test_dispatch_triton_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        max_min_diversity_order(_x(1, 9, 8), 3, impl="triton")


@pytest.mark.parametrize(
    "x,k,valid,param",
    [
        (torch.randn(9, 8), 3, None, "x"),
        (torch.randn(1, 9, 8, dtype=torch.float64), 3, None, "x"),
        (torch.full((1, 9, 8), float("nan")), 3, None, "x"),
        (torch.randn(1, 9, 8), 0, None, "k"),
        (torch.randn(1, 9, 8), 10, None, "k"),
        (torch.randn(1, 9, 8), 3, torch.ones(1, 8, dtype=torch.bool), "valid"),
        (torch.randn(2, 9, 8), 3, torch.arange(9).expand(2, 9) < torch.tensor([[9], [2]]), "k"),
    ],
)
def test_bad_inputs(x, k, valid, param):
    with pytest.raises(ValueError, match=param):
        max_min_diversity_order(x, k, valid=valid, impl="torch")


def test_bad_impl():
    with pytest.raises(ValueError, match="impl"):
        max_min_diversity_order(_x(1, 9, 8), 3, impl="cuda")


# ----------------------------------------------------------------------------------------------------------
# GPU at real shapes (skipped without CUDA)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,c", [(576, 64, 4096), (2880, 320, 4096)], ids=["llava15", "llava16"])
def test_gpu_real_shapes(m, k, c, dtype):
    from prunelab.kernels.max_min_diversity.triton import greedy_max_min_triton

    x = _x(2, m, c, dtype, device="cuda")
    valid = _valid(2, m, device="cuda")
    dist = cosine_distance_ref(x)  # one matrix for both paths: cuBLAS may round differently per call
    for v in (None, valid):
        _check_exact(*greedy_max_min_triton(dist, k, v), *greedy_max_min_ref(dist, k, v), m, v)
    order, _ = max_min_diversity_order(x, k, impl="auto")
    assert (order >= 0).all() and all(row.unique().numel() == k for row in order)
