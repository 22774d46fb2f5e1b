"""Tests for prunelab.kernels.image_query_received (VisionDrop's LLM-stage score, arXiv 2506.22283).

The reference is checked against a direct computation from the full ``[S, S]`` softmax matrix; the Triton
path against the reference. Triton runs under ``TRITON_INTERPRET=1`` here (tests/conftest.py sets it before
triton is imported when CUDA is absent), so shapes are tiny and odd, with small tile overrides to cover
many tiles and masked tails. The Triton wrapper allocates its scratch NaN-filled, so any element the kernels
fail to write makes the comparison fail.
"""

from __future__ import annotations

import pytest
import torch

import prunelab.kernels.image_query_received as iqr_mod
from prunelab.kernels import dispatch
from prunelab.kernels.image_query_received import image_query_received, image_query_received_ref

HAS_TRITON = dispatch.triton_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

# (atol, rtol) of the score against the reference, per input dtype (scores are of order 1 / S)
TOL = {torch.float32: (1e-7, 1e-5), torch.float16: (1e-6, 1e-4), torch.bfloat16: (1e-6, 1e-4)}


def _inputs(b=2, hq=4, hkv=2, s=45, d=24, pads=(0, 6), spans=((3, 33), (10, 22)), dtype=torch.float32,
            device="cpu", seed=0):
    """Random q/k plus a left-padded ``valid`` (``pads[b]`` leading False) and image spans ``[start, end)``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=g) * 1.5  # some peaked rows
    k = torch.randn(b, hkv, s, d, generator=g)
    valid = torch.ones(b, s, dtype=torch.bool)
    for i, p in enumerate(pads):
        valid[i, :p] = False
    start = torch.tensor([sp[0] for sp in spans], dtype=torch.int64)
    end = torch.tensor([sp[1] for sp in spans], dtype=torch.int64)
    return (q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype), valid.to(device),
            start.to(device), end.to(device))


def _naive(q, k, valid, start, end, scale=None, causal=True):
    """The score read off the full softmax matrix ``[B, Hq, S, S]`` of every query, in float64."""
    B, hq, S, d = q.shape
    scale = d**-0.5 if scale is None else scale
    kk = k.double().repeat_interleave(hq // k.shape[1], dim=1)
    logits = q.double() @ kk.transpose(-1, -2) * scale
    visible = valid[:, None, None, :].expand(B, hq, S, S)
    if causal:
        visible = visible & torch.ones(S, S, dtype=torch.bool).tril()
    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)  # padded query rows are NaN, never read
    n = (end - start).tolist()
    out = torch.zeros(B, max(n), dtype=torch.float64)
    for b in range(B):
        s0, e0 = int(start[b]), int(end[b])
        out[b, : n[b]] = probs[b, :, s0:e0, s0:e0].mean(dim=(0, 1))
    return out


def _check_triton(q, k, valid, start, end, causal=True, scale=None, **blocks):
    if blocks:
        from prunelab.kernels.image_query_received.triton import image_query_received_triton

        got = image_query_received_triton(q, k, valid, start, end, scale=scale, causal=causal, **blocks)
    else:
        got = image_query_received(q, k, valid, start, end, scale=scale, causal=causal, impl="triton")
    ref = image_query_received_ref(q, k, valid, start, end, scale=scale, causal=causal)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert torch.isfinite(got).all(), "unwritten (NaN) or non-finite elements"
    n = (end - start).tolist()
    for b in range(q.shape[0]):
        assert (got[b, n[b]:] == 0).all(), "padding past the span must be exactly 0"
    atol, rtol = TOL[q.dtype]
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------------------
# Reference against the full softmax matrix, and its properties
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 4), (4, 1)])
@pytest.mark.parametrize("chunk", [256, 7])
def test_ref_matches_naive(hq, hkv, causal, chunk):
    q, k, valid, start, end = _inputs(hq=hq, hkv=hkv)
    got = image_query_received_ref(q, k, valid, start, end, causal=causal, chunk_size=chunk)
    assert got.shape == (2, 30) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _naive(q, k, valid, start, end, causal=causal), atol=1e-7, rtol=1e-5)
    assert (got[1, 12:] == 0).all()


def test_ref_scale_and_padding_excluded():
    q, k, valid, start, end = _inputs(pads=(4, 9), spans=((4, 40), (9, 30)))
    got = image_query_received_ref(q, k, valid, start, end, scale=0.3, causal=False)
    torch.testing.assert_close(got.double(), _naive(q, k, valid, start, end, scale=0.3, causal=False),
                               atol=1e-7, rtol=1e-5)
    # changing the padded keys must not change anything
    k2 = k.clone()
    k2[1, :, :9] = 100.0
    k2[0, :, :4] = -7.0
    torch.testing.assert_close(image_query_received_ref(q, k2, valid, start, end, scale=0.3, causal=False), got)


@pytest.mark.parametrize("causal", [True, False])
def test_ref_mass(causal):
    # the image is all the valid keys (image right after the padding, nothing after it): each image query's
    # distribution lies on image columns only, so the scores of a sample sum to 1; with text around, to < 1
    q, k, valid, start, end = _inputs(pads=(0, 6), spans=((0, 45), (6, 45)))
    got = image_query_received_ref(q, k, valid, start, end, causal=causal)
    torch.testing.assert_close(got.sum(-1), torch.ones(2), atol=1e-5, rtol=0)
    q, k, valid, start, end = _inputs()
    assert (image_query_received_ref(q, k, valid, start, end, causal=causal).sum(-1) < 1).all()


def test_ref_low_precision_inputs_upcast():
    q, k, valid, start, end = _inputs(dtype=torch.bfloat16)
    got = image_query_received_ref(q, k, valid, start, end)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _naive(q.float(), k.float(), valid, start, end), atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Triton (interpreter on CPU) vs reference
# ----------------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_gqa_padding_two_spans(dtype, causal):
    _check_triton(*_inputs(s=70, d=40, spans=((3, 60), (20, 45)), dtype=dtype), causal=causal)


@needs_triton
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bm,bn", [(16, 16), (16, 32), (32, 16)])
def test_triton_many_tiles(bm, bn, causal):
    # small tiles: spans not aligned to tiles, empty tiles past the short span, GQA group 4, and the causal
    # start of the query loop with query and column tiles of different sizes
    _check_triton(*_inputs(hq=4, hkv=1, s=61, d=20, pads=(5, 0), spans=((5, 53), (24, 41))), causal=causal,
                  block_m=bm, block_n=bn)


@needs_triton
def test_triton_edges_scale_noncontiguous():
    # HF layout: q/k as [B, S, H, d] viewed as [B, H, S, d]; one span ends at S, the other is one token
    b, s, d = 2, 37, 16
    q, k, valid, start, end = _inputs(b=b, s=s, d=d, pads=(0, 3), spans=((30, 37), (3, 4)))
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q.is_contiguous()
    _check_triton(q, k, valid, start, end, scale=0.2, block_m=16, block_n=16)


@needs_triton
def test_triton_bf16_interpreter():
    _check_triton(*_inputs(s=50, d=32, dtype=torch.bfloat16))


# ----------------------------------------------------------------------------------------------------------
# Dispatch and validation
# ----------------------------------------------------------------------------------------------------------


def test_dispatch_torch_on_cpu():
    args = _inputs()
    assert torch.equal(image_query_received(*args, impl="torch"), image_query_received_ref(*args))


def test_dispatch_auto_on_cpu_picks_torch(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return image_query_received_ref(*args, **kwargs)

    monkeypatch.setattr(iqr_mod, "image_query_received_ref", spy)
    image_query_received(*_inputs(), impl="auto")
    assert calls == [1]


def test_dispatch_triton_missing(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="triton"):
        image_query_received(*_inputs(), impl="triton")


@needs_triton
def test_dispatch_triton_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        image_query_received(*_inputs(), impl="triton")


def test_bad_impl():
    with pytest.raises(ValueError, match="impl"):
        image_query_received(*_inputs(), impl="cuda")


def _bad_cases():
    q, k, valid, start, end = _inputs()  # B=2, Hq=4, Hkv=2, S=45, d=24
    meta = torch.device("meta")
    return [
        ("q", q[0], "q"),  # 3-D
        ("q", q.double(), "q"),  # float64
        ("q", q[:, :, :, :0], "q"),  # d = 0
        ("k", k[:, :, :, :16], "k"),  # d mismatch
        ("k", k[:1], "k"),  # B mismatch
        ("k", k[:, :, :40], "k"),  # S mismatch
        ("k", torch.randn(2, 3, 45, 24), "k"),  # Hq=4 not a multiple of Hkv=3
        ("k", k.half(), "k"),  # dtype differs from q
        ("k", k.to(meta), "k"),  # device differs from q
        ("valid", valid.long(), "valid"),
        ("valid", valid[:, :40], "valid"),
        ("valid", valid.to(meta), "valid"),
        ("valid", torch.zeros(2, 45, dtype=torch.bool), "valid"),  # image rows padded
        ("start", start.float(), "start"),
        ("start", start[:1], "start"),
        ("start", torch.tensor([-1, 10]), "start"),
        ("start", torch.tensor([3, 45]), "start"),
        ("start", start.to(meta), "start"),
        ("end", torch.tensor([33, 46]), "end"),  # past S
        ("end", torch.tensor([3, 22]), "end"),  # end == start
        ("end", torch.tensor([33, 5]), "end"),  # end < start
        ("end", [33, 22], "end"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs(case):
    which, bad, param = _bad_cases()[case]
    args = dict(zip(("q", "k", "valid", "start", "end"), _inputs()))
    args[which] = bad
    with pytest.raises(ValueError, match=rf"^{param}:"):
        image_query_received(**args, impl="torch")


# ----------------------------------------------------------------------------------------------------------
# GPU at larger shapes (skipped without CUDA)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "b,hq,hkv,s,d,pads,spans",
    [
        (2, 32, 8, 1200, 128, (0, 57), ((35, 1035), (100, 676))),  # GQA, padding, two spans
        (1, 32, 32, 3300, 128, (0,), ((36, 2916),)),  # LLaVA-NeXT-like: 2,880 image rows
    ],
    ids=["gqa_two_spans", "llava_next"],
)
def test_gpu_triton_vs_reference(b, hq, hkv, s, d, pads, spans, dtype, causal):
    q, k, valid, start, end = _inputs(b, hq, hkv, s, d, pads, spans, dtype=dtype, device="cuda")
    got = image_query_received(q, k, valid, start, end, causal=causal, impl="auto")
    ref = image_query_received_ref(q, k, valid, start, end, causal=causal)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=2e-3)
    n = (end - start).tolist()
    for i in range(b):
        assert (got[i, n[i]:] == 0).all()
