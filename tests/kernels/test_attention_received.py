"""Tests for prunelab.kernels.attention_received: reference properties, Triton vs reference, dispatch.

Triton runs under ``TRITON_INTERPRET=1`` here (tests/conftest.py sets it when CUDA is absent), so shapes are
small and odd to hit the masked tails. The triton wrapper allocates ``out``/``received`` NaN-filled, so any
element the kernels fail to write makes the comparison fail.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import prunelab.kernels.attention_received as ar_mod
from prunelab.kernels import dispatch
from prunelab.kernels.attention_received import attention_received, attention_received_ref

HAS_TRITON = dispatch.triton_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

# (atol, rtol) for out and for received, per input dtype
TOL_OUT = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1.6e-2, 2e-2)}
TOL_RECV = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-4, 1e-3), torch.bfloat16: (1e-3, 1e-2)}


def _qkv(b, h, nq, nk, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (nq, nk, nk))
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def _weights(kind, b, h, nq, device="cpu", seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    if kind is None:
        return None
    shape = (b, nq) if kind == "bn" else (b, h, nq)
    w = torch.rand(shape, generator=g)
    return (w / w.sum(-1, keepdim=True)).to(device)  # a distribution over queries (PageRank step)


def _check(q, k, v, w=None, scale=None, impl="triton"):
    out, recv = attention_received(q, k, v, scale=scale, query_weights=w, impl=impl)
    ref_out, ref_recv = attention_received_ref(q, k, v, scale=scale, query_weights=w)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert recv.shape == k.shape[:3] and recv.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(recv).all(), "unwritten (NaN) or non-finite elements"
    atol, rtol = TOL_OUT[q.dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=rtol)
    atol, rtol = TOL_RECV[q.dtype]
    torch.testing.assert_close(recv, ref_recv, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------------------
# Reference properties
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [None, "bn", "bhn"])
def test_ref_mass_conservation(kind):
    q, k, v = _qkv(2, 3, 37, 51, 24)
    w = _weights(kind, 2, 3, 37)
    if w is not None:
        w = w * 3.0  # not normalised: total mass must still be preserved
    _, recv = attention_received_ref(q, k, v, query_weights=w)
    if w is None:
        total_w = torch.full((2, 3), 37.0)
    elif w.dim() == 2:
        total_w = w.sum(-1, keepdim=True).expand(2, 3)
    else:
        total_w = w.sum(-1)
    torch.testing.assert_close(recv.sum(-1), total_w, atol=1e-4, rtol=1e-5)


def test_ref_received_is_softmax_column_sum():
    q, k, v = _qkv(2, 3, 29, 41, 16)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(16)
    e = torch.exp(logits - logits.amax(-1, keepdim=True))
    probs = e / e.sum(-1, keepdim=True)
    _, recv = attention_received_ref(q, k, v)
    torch.testing.assert_close(recv, probs.sum(-2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [None, 0.3])
def test_ref_out_matches_sdpa(scale):
    q, k, v = _qkv(2, 3, 33, 47, 40)
    out, _ = attention_received_ref(q, k, v, scale=scale)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=scale), atol=1e-5, rtol=0)


def test_ref_head_broadcast_weights():
    q, k, v = _qkv(2, 3, 19, 19, 8)
    w = _weights("bn", 2, 3, 19)
    _, a = attention_received_ref(q, k, v, query_weights=w)
    _, b = attention_received_ref(q, k, v, query_weights=w[:, None, :].expand(2, 3, 19))
    torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------------------
# Triton (interpreter on CPU) vs reference
# ----------------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [32, 64, 40])
def test_triton_n63(d, dtype):
    _check(*_qkv(2, 3, 63, 63, d, dtype))


@needs_triton
@pytest.mark.parametrize(
    "d,dtype", [(32, torch.float32), (64, torch.float32), (40, torch.float32), (64, torch.float16)]
)
def test_triton_n197(d, dtype):
    _check(*_qkv(2, 3, 197, 197, d, dtype))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["bn", "bhn"])
@pytest.mark.parametrize("n,d", [(63, 40), (197, 64)])
def test_triton_query_weights(n, d, kind, dtype):
    _check(*_qkv(2, 3, n, n, d, dtype), w=_weights(kind, 2, 3, n))


@needs_triton
@pytest.mark.parametrize("nq,nk,kind", [(63, 197, None), (197, 63, "bhn"), (1, 70, "bn")])
def test_triton_nq_ne_nk(nq, nk, kind):
    _check(*_qkv(2, 3, nq, nk, 40), w=_weights(kind, 2, 3, nq))


@needs_triton
def test_triton_noncontiguous_and_scale():
    # timm-style layout: qkv [B, N, 3, H, D] permuted to [3, B, H, N, D] -> non-contiguous q/k/v views
    b, n, h, d = 2, 63, 3, 40
    qkv = torch.randn(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    w = _weights("bhn", b, h, n).transpose(1, 2).contiguous().transpose(1, 2)  # strided weights
    _check(q, k, v, w=w, scale=0.25)


@needs_triton
def test_triton_bf16_interpreter():
    _check(*_qkv(2, 3, 63, 63, 32, torch.bfloat16), w=_weights("bn", 2, 3, 63))


@needs_triton
def test_triton_small_blocks_many_tiles():
    from prunelab.kernels.attention_received.triton import attention_received_triton

    q, k, v = _qkv(2, 3, 63, 45, 24)
    w = _weights("bhn", 2, 3, 63)
    out, recv = attention_received_triton(q, k, v, query_weights=w, block_m=16, block_n=32)
    ref_out, ref_recv = attention_received_ref(q, k, v, query_weights=w)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(recv, ref_recv, atol=1e-5, rtol=1e-4)


@needs_triton
def test_triton_n577():
    _check(*_qkv(1, 2, 577, 577, 64, torch.float16), w=_weights("bn", 1, 2, 577))


# ----------------------------------------------------------------------------------------------------------
# Dispatch and validation
# ----------------------------------------------------------------------------------------------------------


def test_dispatch_torch_on_cpu():
    q, k, v = _qkv(2, 3, 17, 17, 8)
    out, recv = attention_received(q, k, v, impl="torch")
    ref_out, ref_recv = attention_received_ref(q, k, v)
    assert torch.equal(out, ref_out) and torch.equal(recv, ref_recv)


def test_dispatch_auto_on_cpu_picks_torch(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return attention_received_ref(*args, **kwargs)

    monkeypatch.setattr(ar_mod, "attention_received_ref", spy)
    attention_received(*_qkv(1, 2, 9, 9, 8), impl="auto")
    assert calls == [1]


def test_dispatch_triton_missing(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="triton"):
        attention_received(*_qkv(1, 1, 9, 9, 8), impl="triton")


@needs_triton
def test_dispatch_triton_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        attention_received(*_qkv(1, 1, 9, 9, 8), impl="triton")


def test_bad_impl():
    with pytest.raises(ValueError, match="impl"):
        attention_received(*_qkv(1, 1, 9, 9, 8), impl="cuda")


@pytest.mark.parametrize(
    "which,bad,param",
    [
        ("q", torch.randn(2, 9, 8), "q"),
        ("k", torch.randn(2, 3, 9, 16), "k"),  # D mismatch
        ("k", torch.randn(1, 3, 9, 8), "k"),  # B mismatch
        ("v", torch.randn(2, 3, 10, 8), "v"),  # Nk mismatch with k
        ("v", torch.randn(2, 3, 9, 8, dtype=torch.float64), "v"),
        ("query_weights", torch.rand(2, 3, 10), "query_weights"),
        ("query_weights", torch.rand(3, 9), "query_weights"),
    ],
)
def test_bad_inputs(which, bad, param):
    args = dict(zip("qkv", _qkv(2, 3, 9, 9, 8), strict=True))
    w = None
    if which == "query_weights":
        w = bad
    else:
        args[which] = bad
    with pytest.raises(ValueError, match=param):
        attention_received(args["q"], args["k"], args["v"], query_weights=w, impl="torch")


# ----------------------------------------------------------------------------------------------------------
# GPU at real shapes (skipped without CUDA)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", [None, "bn"])
@pytest.mark.parametrize("b,h,n,d", [(32, 12, 197, 64), (8, 16, 577, 64)], ids=["vitb", "clipl"])
def test_gpu_real_shapes(b, h, n, d, kind, dtype):
    q, k, v = _qkv(b, h, n, n, d, dtype, device="cuda")
    w = _weights(kind, b, h, n, device="cuda")
    out, recv = attention_received(q, k, v, query_weights=w, impl="auto")
    ref_out, ref_recv = attention_received_ref(q, k, v, query_weights=w)
    assert torch.isfinite(out).all() and torch.isfinite(recv).all()
    atol, rtol = TOL_OUT[dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(recv, ref_recv, atol=1e-3, rtol=1e-3)
    total = torch.full_like(recv[..., 0], float(n)) if w is None else w.sum(-1, keepdim=True).expand(b, h)
    torch.testing.assert_close(recv.sum(-1), total, atol=1e-2, rtol=1e-3)
