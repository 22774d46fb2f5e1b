"""Tests for the FASA decode kernels: partial_score_topk (partial-dim scores + top-N) and sparse_decode_attention.

Triton runs under ``TRITON_INTERPRET=1`` here (tests/conftest.py sets it when CUDA is absent), so shapes are
small and odd to hit the masked tails. The Triton wrappers allocate indices filled with ``-2`` and outputs
with NaN, so any element the kernels fail to write makes a check fail.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import prunelab.kernels.partial_score_topk as st_mod
import prunelab.kernels.sparse_decode_attention as sd_mod
from prunelab.kernels import dispatch
from prunelab.kernels.partial_score_topk import partial_score_topk, partial_score_topk_ref, partial_scores_ref
from prunelab.kernels.sparse_decode_attention import sparse_decode_attention, sparse_decode_attention_ref

needs_triton = pytest.mark.skipif(not dispatch.triton_available(), reason="triton not installed")
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1.6e-2, 2e-2)}  # atol, rtol


def _inputs(b, hq, hkv, t, d, m, dtype=torch.float32, device="cpu", seed=0):
    """Random q, k_cache, v_cache and FASA-style dims: m/2 RoPE chunks {j, j + d/2} per query head."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, hq, d, generator=g, device=device).to(dtype)
    k, v = (torch.randn(b, hkv, t, d, generator=g, device=device).to(dtype) for _ in range(2))
    gc = torch.Generator().manual_seed(seed)
    chunks = torch.stack([torch.randperm(d // 2, generator=gc)[: m // 2] for _ in range(hq)])
    return q, k, v, torch.cat([chunks, chunks + d // 2], dim=1).to(device)


def _lengths(b, t, device="cpu"):
    return torch.tensor([t - 5, max(1, t // 3)] * b, device=device)[:b]


def _dense(q, k, v, lengths=None):
    """Dense decode attention with SDPA, GQA by repeating kv heads; padding masked by lengths."""
    g = q.shape[1] // k.shape[1]
    mask = None
    if lengths is not None:
        mask = (torch.arange(k.shape[2], device=q.device) < lengths[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.float()[:, :, None], k.float().repeat_interleave(g, 1),
                                         v.float().repeat_interleave(g, 1), attn_mask=mask)
    return out[:, :, 0]


def _assert_kept_contract(idx, lengths, budget):
    """Row [b, h]: N_b = min(budget, lengths[b]) positions < lengths[b], strictly increasing, then -1s."""
    B, hq, n = idx.shape
    assert idx.dtype == torch.int64 and n == budget
    n_keep = torch.clamp(lengths, max=budget)[:, None, None]
    kept = (torch.arange(n, device=idx.device) < n_keep).expand(B, hq, n)
    assert torch.equal(idx >= 0, kept) and (idx[~kept] == -1).all(), "wrong -1 padding or unwritten (-2) slots"
    assert (idx < lengths[:, None, None]).all(), "a padding position was selected"
    assert (idx.diff(dim=-1)[kept[..., 1:]] > 0).all(), "kept indices not sorted ascending / unique"


def _assert_selection(idx, ref_idx, scores, lengths, budget):
    """idx obeys the contract and equals ref_idx, or differs only by near-tied scores (summation order)."""
    _assert_kept_contract(idx, lengths, budget)
    if torch.equal(idx, ref_idx):
        return
    picked = [scores.gather(-1, i.clamp(min=0)).masked_fill(i < 0, 0.0).sort(-1).values for i in (idx, ref_idx)]
    torch.testing.assert_close(picked[0], picked[1], atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Reference properties
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_lengths", [False, True])
@pytest.mark.parametrize("extra", [0, 7])
def test_ref_keep_all_equals_dense(use_lengths, extra):
    q, k, v, _ = _inputs(2, 4, 2, 37, 32, 32)
    all_dims = torch.stack([torch.randperm(32) for _ in range(4)])
    lengths = _lengths(2, 37) if use_lengths else None
    idx = partial_score_topk(q, k, all_dims, 37 + extra, lengths=lengths, impl="torch")
    out = sparse_decode_attention(q, k, v, idx, impl="torch")
    torch.testing.assert_close(out, _dense(q, k, v, lengths), atol=1e-5, rtol=0)


@pytest.mark.parametrize("budget", [1, 5, 20])
def test_ref_all_dims_is_oracle_topk(budget):
    q, k, _, _ = _inputs(2, 4, 2, 41, 16, 16)
    full = torch.einsum("bhd,bhtd->bht", q, k.repeat_interleave(2, 1))
    idx = partial_score_topk_ref(q, k, torch.arange(16).repeat(4, 1), budget)
    oracle = full.topk(budget, dim=-1).indices.sort(-1).values
    _assert_selection(idx, oracle, full, torch.full((2,), 41), budget)
    torch.testing.assert_close(partial_scores_ref(q, k, torch.arange(16).flip(0).repeat(4, 1)), full)


def test_ref_lengths_padding_and_ties():
    q, k, _, dims = _inputs(2, 4, 4, 30, 16, 4)
    k = k.round()  # integer scores: many exact ties, broken towards the lower position
    q = q.round()
    lengths = torch.tensor([30, 9])
    idx = partial_score_topk_ref(q, k, dims, 12, lengths=lengths)
    _assert_kept_contract(idx, lengths, 12)
    assert (idx[1, :, 9:] == -1).all() and torch.equal(idx[1, :, :9], torch.arange(9).expand(4, 9))
    s = partial_scores_ref(q, k, dims)[0]
    for h in range(4):  # tie rule: the kept set is the first 12 positions of a stable descending sort
        assert idx[0, h].tolist() == sorted(sorted(range(30), key=lambda t: -s[h, t].item())[:12])


@pytest.mark.parametrize("hkv", [1, 2])
def test_ref_gqa_equals_repeated_kv(hkv):
    q, k, v, dims = _inputs(2, 4, hkv, 45, 32, 8)
    idx = partial_score_topk_ref(q, k, dims, 10, lengths=_lengths(2, 45))
    kr, vr = k.repeat_interleave(4 // hkv, 1), v.repeat_interleave(4 // hkv, 1)
    assert torch.equal(idx, partial_score_topk_ref(q, kr, dims, 10, lengths=_lengths(2, 45)))
    torch.testing.assert_close(sparse_decode_attention_ref(q, k, v, idx), sparse_decode_attention_ref(q, kr, vr, idx))


def test_ref_attention_ignores_order_and_scattered_padding():
    q, k, v, _ = _inputs(2, 4, 2, 29, 16, 4)
    idx = torch.stack([torch.randperm(29)[:8] for _ in range(8)]).view(2, 4, 8)
    padded = torch.cat([idx, torch.full((2, 4, 5), -1)], -1)[..., torch.randperm(13)]
    a = sparse_decode_attention_ref(q, k, v, idx, scale=0.3)
    torch.testing.assert_close(sparse_decode_attention_ref(q, k, v, padded, scale=0.3), a)
    torch.testing.assert_close(sparse_decode_attention_ref(q, k, v, idx.flip(-1), scale=0.3), a)


# ----------------------------------------------------------------------------------------------------------
# Triton (interpreter on CPU) vs reference
# ----------------------------------------------------------------------------------------------------------

# (Hkv, d, T, N, m, dtype, lengths): every listed value of each axis appears; B=2, Hq=4 throughout
CASES = [
    (1, 32, 63, 1, 4, torch.float32, False),
    (2, 64, 197, 16, 16, torch.float16, True),
    (4, 32, 197, 50, 16, torch.float32, True),
    (2, 32, 63, 50, 4, torch.float16, True),
    (4, 64, 63, 16, 4, torch.float32, False),
    (1, 64, 197, 50, 16, torch.float16, False),
    (2, 64, 63, 1, 16, torch.float32, True),
    (1, 32, 197, 16, 4, torch.float16, True),
]
CASE_IDS = [f"hkv{c[0]}-d{c[1]}-T{c[2]}-N{c[3]}-m{c[4]}-{str(c[5])[6:]}{'-len' if c[6] else ''}" for c in CASES]


def _check_pair(q, k, v, dims, budget, lengths):
    """Both ops with Triton against the reference, each fed the same indices."""
    lens = lengths if lengths is not None else torch.full((q.shape[0],), k.shape[2], device=q.device)
    idx = partial_score_topk(q, k, dims, budget, lengths=lengths, impl="triton")
    ref_idx = partial_score_topk_ref(q, k, dims, budget, lengths=lengths)
    _assert_selection(idx, ref_idx, partial_scores_ref(q, k, dims), lens, budget)
    out = sparse_decode_attention(q, k, v, ref_idx, impl="triton")
    ref = sparse_decode_attention_ref(q, k, v, ref_idx)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all(), "unwritten (NaN) output"
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[q.dtype][0], rtol=TOL[q.dtype][1])


@needs_triton
@pytest.mark.parametrize("hkv,d,t,n,m,dtype,use_lengths", CASES, ids=CASE_IDS)
def test_triton_matches_reference(hkv, d, t, n, m, dtype, use_lengths):
    q, k, v, dims = _inputs(2, 4, hkv, t, d, m, dtype)
    _check_pair(q, k, v, dims, n, _lengths(2, t) if use_lengths else None)


@needs_triton
def test_triton_bf16_and_budget_above_t():
    q, k, v, dims = _inputs(2, 4, 2, 63, 32, 8, torch.bfloat16)
    _check_pair(q, k, v, dims, 70, _lengths(2, 63))


@needs_triton
def test_triton_scores_and_exact_ties_many_blocks():
    from prunelab.kernels.partial_score_topk.triton import partial_score_topk_triton

    q, k, _, dims = _inputs(2, 4, 2, 197, 32, 8)
    q, k = q.round(), k.round()  # integer scores: exact ties, so the tie rule must match bit for bit
    lengths = torch.tensor([197, 100])
    idx, scores = partial_score_topk_triton(q, k, dims, 40, lengths=lengths, block_t=16, return_scores=True)
    ref = partial_scores_ref(q, k, dims).masked_fill(torch.arange(197) >= lengths[:, None, None], float("-inf"))
    assert torch.equal(scores, ref)
    assert torch.equal(idx, partial_score_topk_ref(q, k, dims, 40, lengths=lengths))


@needs_triton
def test_triton_noncontiguous_gqa_and_scale():
    q, k, v, dims = _inputs(2, 4, 2, 63, 40, 6)  # d=40: head dim padded inside the kernels
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # [B, T, Hkv, d] storage, as some caches use
    q = q.transpose(0, 1).contiguous().transpose(0, 1)
    dims = dims.t().contiguous().t()
    idx = partial_score_topk(q, k, dims, 17, impl="triton")
    ref_idx = partial_score_topk_ref(q, k, dims, 17)
    _assert_selection(idx, ref_idx, partial_scores_ref(q, k, dims), torch.full((2,), 63), 17)
    padded = torch.cat([idx, torch.full((2, 4, 9), -1)], -1)[..., torch.randperm(26)]  # scattered -1
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    out = sparse_decode_attention(q, k, v, padded.transpose(1, 2).contiguous().transpose(1, 2), scale=0.2,
                                  impl="triton")
    torch.testing.assert_close(out, sparse_decode_attention_ref(q, kr, vr, idx, scale=0.2), atol=1e-5, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_split_n(dtype):
    from prunelab.kernels.sparse_decode_attention.triton import sparse_decode_attention_triton

    q, k, v, _ = _inputs(2, 4, 2, 197, 40, 4, dtype)
    idx = torch.stack([torch.randperm(197)[:80] for _ in range(8)]).view(2, 4, 80)
    idx[0, 1, :40] = -1  # the first splits of this row are all padding
    idx[1, 2, 50:] = -1
    out = sparse_decode_attention_triton(q, k, v, idx, block_n=16, num_splits=5)
    torch.testing.assert_close(out.float(), sparse_decode_attention_ref(q, k, v, idx).float(), atol=TOL[dtype][0],
                               rtol=TOL[dtype][1])


@needs_triton
def test_triton_keep_all_equals_dense():
    q, k, v, _ = _inputs(2, 4, 1, 63, 32, 32)
    lengths = _lengths(2, 63)
    idx = partial_score_topk(q, k, torch.arange(32).repeat(4, 1), 63, lengths=lengths, impl="triton")
    out = sparse_decode_attention(q, k, v, idx, impl="triton")
    torch.testing.assert_close(out, _dense(q, k, v, lengths), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Dispatch and validation
# ----------------------------------------------------------------------------------------------------------


def test_dispatch_auto_on_cpu_picks_torch(monkeypatch):
    calls = []
    monkeypatch.setattr(st_mod, "partial_score_topk_ref", lambda *a, **kw: calls.append("st") or -1)
    monkeypatch.setattr(sd_mod, "sparse_decode_attention_ref", lambda *a, **kw: calls.append("sd") or -1)
    q, k, v, dims = _inputs(1, 2, 1, 9, 8, 2)
    partial_score_topk(q, k, dims, 3)
    sparse_decode_attention(q, k, v, torch.zeros(1, 2, 3, dtype=torch.int64))
    assert calls == ["st", "sd"]


@pytest.mark.parametrize("mod", [st_mod, sd_mod])
def test_dispatch_triton_missing_or_no_interpreter(monkeypatch, mod):
    q, k, v, dims = _inputs(1, 2, 1, 9, 8, 2)
    call = (lambda: partial_score_topk(q, k, dims, 3, impl="triton")) if mod is st_mod else (
        lambda: sparse_decode_attention(q, k, v, torch.zeros(1, 2, 3, dtype=torch.int64), impl="triton"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET" if dispatch.triton_available() else "triton"):
        call()
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="triton"):
        call()


_Q, _K, _V, _DIMS = _inputs(2, 4, 2, 9, 8, 2)
_IDX = torch.zeros(2, 4, 3, dtype=torch.int64)


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"impl": "cuda"}, "impl"),
        ({"q": _Q[0]}, "q"),
        ({"q": _Q.double()}, "q"),
        ({"k_cache": _K[:, :, :, :4]}, "k_cache"),  # d mismatch
        ({"k_cache": torch.randn(2, 3, 9, 8)}, "k_cache"),  # Hq % Hkv != 0
        ({"k_cache": _K.half()}, "k_cache"),
        ({"dims": _DIMS.int()}, "dims"),
        ({"dims": _DIMS[:3]}, "dims"),
        ({"dims": _DIMS + 8}, "dims"),  # out of range
        ({"dims": torch.zeros(4, 2, dtype=torch.int64)}, "dims"),  # repeated
        ({"budget": 0}, "budget"),
        ({"budget": 2.5}, "budget"),
        ({"lengths": torch.tensor([9, 0])}, "lengths"),
        ({"lengths": torch.tensor([9, 10])}, "lengths"),
        ({"lengths": torch.tensor([9])}, "lengths"),
    ],
)
def test_score_topk_bad_inputs(kw, param):
    args = {"q": _Q, "k_cache": _K, "dims": _DIMS, "budget": 3, "lengths": None, "impl": "torch"} | kw
    with pytest.raises(ValueError, match=param):
        partial_score_topk(args.pop("q"), args.pop("k_cache"), args.pop("dims"), args.pop("budget"), **args)


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"impl": "gpu"}, "impl"),
        ({"q": _Q[:, :, :4]}, "k_cache"),
        ({"v_cache": _V[:, :, :5]}, "v_cache"),
        ({"v_cache": _V.half()}, "v_cache"),
        ({"k_cache": torch.randn(2, 3, 9, 8), "v_cache": torch.randn(2, 3, 9, 8)}, "k_cache"),
        ({"indices": _IDX.int()}, "indices"),
        ({"indices": _IDX[:, :2]}, "indices"),
        ({"indices": _IDX + 9}, "indices"),  # >= T
        ({"indices": _IDX - 2}, "indices"),
        ({"indices": torch.cat([_IDX[:1], -torch.ones_like(_IDX[:1])])}, "indices"),  # a row with no valid index
        ({"scale": "x"}, "scale"),
    ],
)
def test_sparse_attention_bad_inputs(kw, param):
    args = {"q": _Q, "k_cache": _K, "v_cache": _V, "indices": _IDX, "scale": None, "impl": "torch"} | kw
    with pytest.raises(ValueError, match=param):
        sparse_decode_attention(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("indices"),
                                **args)


# ----------------------------------------------------------------------------------------------------------
# GPU at real shapes (skipped without CUDA)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("use_lengths", [False, True])
@pytest.mark.parametrize("frac", [None, 0.189], ids=["N256", "N18.9%"])
@pytest.mark.parametrize("t", [8192, 32768])
def test_gpu_real_shapes(t, frac, use_lengths, dtype):
    budget = 256 if frac is None else math.floor(frac * t)
    q, k, v, dims = _inputs(4, 32, 8, t, 128, 32, dtype, device="cuda")
    lengths = torch.tensor([t, t - 1000, t // 2, 200], device="cuda") if use_lengths else None
    lens = lengths if use_lengths else torch.full((4,), t, device="cuda")
    idx = partial_score_topk(q, k, dims, budget, lengths=lengths, impl="auto")
    ref_idx = partial_score_topk_ref(q, k, dims, budget, lengths=lengths)
    _assert_selection(idx, ref_idx, partial_scores_ref(q, k, dims), lens, budget)
    out = sparse_decode_attention(q, k, v, ref_idx, impl="auto")
    ref = sparse_decode_attention_ref(q, k, v, ref_idx)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype][0], rtol=TOL[dtype][1])
