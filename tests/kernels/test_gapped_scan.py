"""Tests for prunelab.kernels.gapped_scan: the reference against a full-length scan, Triton against the reference.

The oracle is :func:`prunelab.methods.top_vim.scan.selective_scan_ref` (mamba-ssm's reference semantics) run over
the full length L: the kept tokens' inputs are scattered to their positions, the pruned slots are filled with
garbage inputs that ``keep`` must silence, and the step size is given already biased and soft-plussed
(``delta_softplus=False``) so that a pruned slot can carry exactly Δ = ``gap_delta`` while a kept token carries
``softplus(delta + delta_bias)`` computed with the same torch ops as the reference.

Triton runs under ``TRITON_INTERPRET=1`` here (tests/conftest.py sets it when CUDA is absent), where each step of
the sequential loop costs milliseconds, so the shapes are small and odd (K in {1, 7, 63}, D and N not powers of
two) and the whole file stays well under a minute on one core. The wrapper allocates ``y`` NaN-filled, so any
element the kernel fails to write fails the finiteness check.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import prunelab.kernels.gapped_scan as gs_mod
from prunelab.kernels import dispatch
from prunelab.kernels.gapped_scan import gapped_scan, gapped_scan_ref
from prunelab.methods.top_vim.scan import selective_scan_ref

HAS_TRITON = dispatch.triton_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

# Triton vs the float32 reference, (atol, rtol) on y. Both compute in fp32 from the same (rounded) inputs, so the
# fp32 difference is summation order over N and exp's last bits; for 16-bit outputs it is one rounding step of the
# final cast on a value the two paths put on different sides of a rounding boundary: one ulp, 2^-10 relative for
# fp16 and 2^-7 for bf16.
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 1e-3), torch.bfloat16: (2e-2, 1e-2)}


def _positions(kind: str, b: int, k: int, length: int, g: torch.Generator) -> torch.Tensor:
    """[b, k] int64 kept positions in [0, length), a different set per row."""
    rows = []
    for _ in range(b):
        if kind == "all":
            p = torch.arange(k)
        elif kind == "random":
            p = torch.randperm(length, generator=g)[:k].sort().values
        elif kind == "ends":  # pruned runs at both ends and one long gap in the middle
            lo = int(torch.randint(length // 8, length // 4, (1,), generator=g))
            hi = int(torch.randint(3 * length // 4, 7 * length // 8, (1,), generator=g))
            first = k // 2
            p = torch.cat([lo + torch.arange(first), hi - (k - first) + torch.arange(k - first)])
        else:
            raise AssertionError(kind)
        rows.append(p)
    return torch.stack(rows).to(torch.int64)


def _inputs(b, d, n, k, *, kind="random", length=None, dtype=torch.float32, device="cpu", seed=0, delta_scale=0.5):
    """Mamba-like inputs: S4D-real A = -(1..N), dt bias the inverse softplus of a log-uniform Δ in [1e-3, 1e-1]
    (mamba-ssm's dt_proj init), gap_delta = softplus(dt bias) as ToP-ViM's caller passes it."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    length = k if length is None else length
    dt0 = torch.exp(torch.rand(d, generator=g) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                    + torch.log(torch.tensor(1e-3)))
    delta_bias = dt0 + torch.log(-torch.expm1(-dt0))  # inverse softplus
    x = dict(
        u=torch.randn(b, d, k, generator=g),
        delta=delta_scale * torch.randn(b, d, k, generator=g),
        A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1) * (0.5 + torch.rand(d, 1, generator=g)),
        B=torch.randn(b, n, k, generator=g),
        C=torch.randn(b, n, k, generator=g),
        positions=_positions(kind, b, k, length, g),
        D=torch.randn(d, generator=g),
        z=torch.randn(b, d, k, generator=g),
        delta_bias=delta_bias,
    )
    x["gap_delta"] = F.softplus(delta_bias)
    for name in ("u", "delta", "B", "C", "z"):
        x[name] = x[name].to(dtype)
    return {name: t.to(device) for name, t in x.items()}


def _positive_steps(x):
    """For ``delta_softplus=False``: steps already positive, as a caller that applies softplus itself passes them
    (a negative Δ grows the state exponentially and overflows over a long sequence)."""
    x = dict(x)
    x["delta"] = (0.05 * x["delta"].float().abs()).to(x["delta"].dtype)
    if x["delta_bias"] is not None:
        x["delta_bias"] = x["gap_delta"].clone()
    return x


def _call(fn, x, softplus=True, **kw):
    return fn(x["u"], x["delta"], x["A"], x["B"], x["C"], x["positions"], x["gap_delta"], D=x["D"], z=x["z"],
              delta_bias=x["delta_bias"], delta_softplus=softplus, **kw)


def _full_length_oracle(x, length, softplus=True):
    """selective_scan_ref over L with keep: pruned slots get Δ = gap_delta and garbage inputs that keep silences."""
    b, d, k = x["u"].shape
    n = x["A"].shape[1]
    pos = x["positions"]
    g = torch.Generator(device="cpu").manual_seed(123)
    keep = torch.zeros(b, length, dtype=torch.bool, device=pos.device).scatter_(1, pos, True)

    def scatter(t, rows):  # [b, rows, k] -> [b, rows, L], garbage at the pruned slots
        full = (10 * torch.randn(b, rows, length, generator=g)).to(device=t.device, dtype=t.dtype)
        return full.scatter(2, pos[:, None, :].expand(b, rows, k), t)

    dt = x["delta"].float() + x["delta_bias"].float()[:, None]
    if softplus:
        dt = F.softplus(dt)
    dt_full = x["gap_delta"].float()[None, :, None].expand(b, d, length).scatter(2, pos[:, None, :].expand(b, d, k), dt)
    y = selective_scan_ref(scatter(x["u"], d), dt_full, x["A"], scatter(x["B"], n), scatter(x["C"], n), D=x["D"],
                           z=scatter(x["z"], d), delta_softplus=False, keep=keep)
    return y.gather(2, pos[:, None, :].expand(b, d, k))


def _check_triton(x, softplus=True, **kw):
    y = _call(gapped_scan, x, softplus, impl="triton", **kw)
    ref = _call(gapped_scan_ref, x, softplus)
    assert y.shape == x["u"].shape and y.dtype == x["u"].dtype
    assert torch.isfinite(y).all(), "unwritten (NaN) or non-finite elements"
    atol, rtol = TOL[x["u"].dtype]
    torch.testing.assert_close(y.float(), ref.float(), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------------------
# Reference against the full-length scan
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize(
    "kind,b,d,n,k,length",
    [("random", 3, 24, 16, 63, 197), ("random", 2, 5, 4, 7, 31), ("all", 2, 13, 16, 63, 63),
     ("random", 4, 9, 8, 1, 120), ("ends", 3, 17, 12, 7, 200), ("ends", 2, 11, 16, 63, 197)],
    ids=["k63", "k7", "all", "one_kept", "ends_k7", "ends_k63"],
)
def test_ref_matches_full_length_oracle(kind, b, d, n, k, length, softplus):
    x = _inputs(b, d, n, k, kind=kind, length=length, seed=k + d)
    if not softplus:
        x = _positive_steps(x)
    y = _call(gapped_scan_ref, x, softplus)
    # fp32 both ways; the oracle multiplies g factors exp(gap_delta A) one slot at a time where the reference takes
    # one exp of the summed exponent, so the states differ by about g float32 roundings (relative), not more
    torch.testing.assert_close(y, _full_length_oracle(x, length, softplus), atol=1e-5, rtol=1e-4)


def test_ref_all_kept_is_dense_scan():
    x = _inputs(2, 19, 16, 63, kind="all")
    y = _call(gapped_scan_ref, x)
    dense = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"],
                               delta_bias=x["delta_bias"], delta_softplus=True)
    # no gaps: the same float32 recurrence; only the order of the N-sum (einsum) and of the products in
    # Δ B u may differ, a few float32 ulps
    torch.testing.assert_close(y, dense, atol=2e-6, rtol=1e-6)


def test_ref_zero_gap_delta_is_physical_removal():
    """gap_delta = 0 makes the pruned slots identities: the scan of the shortened sequence (alignment "none")."""
    x = _inputs(2, 11, 8, 63, length=197)
    x["gap_delta"] = torch.zeros_like(x["gap_delta"])
    packed = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"],
                                delta_bias=x["delta_bias"], delta_softplus=True)
    torch.testing.assert_close(_call(gapped_scan_ref, x), packed, atol=2e-6, rtol=1e-6)


def test_ref_leading_pruned_slots_change_nothing():
    x = _inputs(2, 7, 4, 7, length=40)
    shifted = dict(x, positions=x["positions"] + 1000)
    assert torch.equal(_call(gapped_scan_ref, x), _call(gapped_scan_ref, shifted))


def test_ref_gap_decay_moves_the_output():
    """Widening one gap changes the tokens after it and none before it."""
    x = _inputs(1, 7, 4, 7, kind="all")
    wider = dict(x, positions=x["positions"] + (torch.arange(7) >= 4).long() * 5)
    y, yw = _call(gapped_scan_ref, x), _call(gapped_scan_ref, wider)
    assert torch.equal(y[..., :4], yw[..., :4])
    assert (y[..., 4:] - yw[..., 4:]).abs().max() > 1e-3


def test_ref_batch_rows_are_independent():
    x = _inputs(3, 9, 8, 63, length=197)
    y = _call(gapped_scan_ref, x)
    for i in range(3):
        row = {name: (t[i:i + 1] if name in ("u", "delta", "B", "C", "z", "positions") else t) for name, t in x.items()}
        torch.testing.assert_close(_call(gapped_scan_ref, row), y[i:i + 1], atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Triton (interpreter on CPU) against the reference
# ----------------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize(
    "kind,b,d,n,k,length,dtype",
    [("random", 2, 24, 16, 63, 197, torch.float32), ("random", 2, 13, 12, 63, 197, torch.float16),
     ("random", 2, 13, 12, 63, 197, torch.bfloat16), ("all", 2, 21, 16, 63, 63, torch.float32),
     ("random", 3, 5, 4, 1, 120, torch.float32), ("random", 3, 5, 4, 1, 120, torch.bfloat16),
     ("ends", 3, 17, 12, 7, 200, torch.float32), ("ends", 3, 17, 12, 7, 200, torch.float16),
     ("ends", 2, 9, 16, 63, 197, torch.bfloat16), ("random", 2, 6, 5, 7, 9, torch.float32)],
    ids=["k63-fp32", "k63-fp16", "k63-bf16", "all-fp32", "one-fp32", "one-bf16", "ends-k7-fp32", "ends-k7-fp16",
         "ends-k63-bf16", "dense-ish-k7"],
)
def test_triton_matches_ref(kind, b, d, n, k, length, dtype):
    _check_triton(_inputs(b, d, n, k, kind=kind, length=length, dtype=dtype, seed=k * d))


@needs_triton
@pytest.mark.parametrize("opts", ["none", "bias", "skip", "gate", "softplus"])
def test_triton_optional_inputs(opts):
    x = _inputs(2, 10, 7, 7, length=25, seed=3)
    for name in ("D", "z", "delta_bias"):
        if {"skip": "D", "gate": "z", "bias": "delta_bias"}.get(opts) != name:
            x[name] = None
    _check_triton(x if opts == "softplus" else _positive_steps(x), softplus=opts == "softplus")


@needs_triton
def test_triton_softplus_extremes():
    """Raw steps across softplus's threshold (20) and far below it, where Δ is tiny and log(1 + e^x) would lose
    its digits; with A small enough that a large Δ does not simply flush the state."""
    x = _inputs(2, 16, 4, 7, length=30, seed=5)
    x["delta"] = torch.linspace(-30.0, 30.0, 2 * 16 * 7)[torch.randperm(2 * 16 * 7)].reshape(2, 16, 7)
    x["delta_bias"] = None
    x["A"] = x["A"] * 1e-3
    _check_triton(x)
    # Δ itself, through y = Δ B u read out with C = B = 1, u = 1, D = 0, no gate, on a one-token sequence
    one = dict(x, u=torch.ones(2, 16, 1), delta=x["delta"][..., :1], B=torch.ones(2, 4, 1) / 4, C=torch.ones(2, 4, 1),
               z=None, D=None, positions=x["positions"][:, :1])
    y = _call(gapped_scan, one, impl="triton")
    torch.testing.assert_close(y, F.softplus(one["delta"]), atol=0, rtol=2e-6)


@needs_triton
def test_triton_noncontiguous():
    b, d, n, k = 2, 11, 6, 17
    x = _inputs(b, d, n, k, length=90, seed=9)
    xz = torch.randn(b, 2 * d, k)  # Vim's in_proj output [B, 2 D, L]: u and z are strided views of one tensor
    x["u"], x["z"] = xz[:, :d], xz[:, d:]
    x["delta"] = x["delta"].transpose(1, 2).contiguous().transpose(1, 2)
    x["B"] = x["B"].transpose(1, 2).contiguous().transpose(1, 2)  # [B, K, N] storage
    x["C"] = torch.randn(b, 2 * n, k)[:, ::2]
    x["positions"] = torch.stack([x["positions"], x["positions"]], dim=-1)[..., 0]
    assert not any(x[name].is_contiguous() for name in ("u", "z", "delta", "B", "C", "positions"))
    _check_triton(x)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_several_channel_blocks(dtype):
    from prunelab.kernels.gapped_scan.triton import gapped_scan_triton

    x = _inputs(2, 21, 12, 7, length=40, dtype=dtype, seed=11)
    y = _call(gapped_scan_triton, x, block_d=8, num_warps=1)  # 3 blocks, the last one 5/8 full
    assert torch.isfinite(y).all()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.float(), _call(gapped_scan_ref, x).float(), atol=atol, rtol=rtol)


@needs_triton
def test_triton_against_full_length_oracle():
    x = _inputs(2, 14, 16, 63, kind="ends", length=197, seed=2)
    y = _call(gapped_scan, x, impl="triton")
    torch.testing.assert_close(y, _full_length_oracle(x, 197), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Dispatch and validation
# ----------------------------------------------------------------------------------------------------------


def test_dispatch_torch_on_cpu():
    x = _inputs(2, 5, 4, 7, length=20)
    assert torch.equal(_call(gapped_scan, x, impl="torch"), _call(gapped_scan_ref, x))


def test_dispatch_auto_on_cpu_picks_torch(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return gapped_scan_ref(*args, **kwargs)

    monkeypatch.setattr(gs_mod, "gapped_scan_ref", spy)
    _call(gapped_scan, _inputs(1, 5, 4, 7, length=20), impl="auto")
    assert calls == [1]


def test_dispatch_triton_missing(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="triton"):
        _call(gapped_scan, _inputs(1, 5, 4, 7, length=20), impl="triton")


@needs_triton
def test_dispatch_triton_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _call(gapped_scan, _inputs(1, 5, 4, 7, length=20), impl="triton")


def test_bad_impl():
    with pytest.raises(ValueError, match="impl"):
        _call(gapped_scan, _inputs(1, 5, 4, 7, length=20), impl="cuda")


_B, _D, _N, _K = 2, 5, 4, 7
BAD = [
    ("u", torch.randn(_B, _D), "u"),
    ("u", torch.randn(_B, _D, 0), "u"),
    ("u", torch.randn(_B, _D, _K, dtype=torch.float64), "u"),
    ("delta", torch.randn(_B, _D, _K + 1), "delta"),
    ("delta", torch.randn(_B, _D, _K).half(), "delta"),  # dtype must match u
    ("A", torch.randn(_D + 1, _N), "A"),
    ("A", torch.randn(_D, _N, dtype=torch.complex64), "A"),
    ("B", torch.randn(_B, _N + 1, _K), "B"),
    ("C", torch.randn(_B, _N, _K - 1), "C"),
    ("C", torch.randn(_B, _N, _K, dtype=torch.float64), "C"),
    ("z", torch.randn(_B, _D + 1, _K), "z"),
    ("z", torch.randn(_B, _D, _K).bfloat16(), "z"),
    ("D", torch.randn(_D + 1), "D"),
    ("delta_bias", torch.randn(1, _D), "delta_bias"),
    ("gap_delta", torch.rand(_N), "gap_delta"),
    ("gap_delta", torch.full((_D,), -0.1), "gap_delta"),
    ("gap_delta", torch.full((_D,), float("nan")), "gap_delta"),
    ("gap_delta", [0.1] * _D, "gap_delta"),
    ("positions", torch.arange(_K).repeat(_B, 1).int(), "positions"),
    ("positions", torch.arange(_K).repeat(_B, 1).float(), "positions"),
    ("positions", torch.arange(_K + 1).repeat(_B, 1), "positions"),
    ("positions", torch.arange(_K).repeat(_B, 1) - 1, "positions"),  # negative
    ("positions", torch.tensor([[0, 1, 2, 2, 3, 4, 5]] * _B), "positions"),  # repeated
    ("positions", torch.tensor([[0, 1, 2, 3, 4, 6, 5], [0, 1, 2, 3, 4, 5, 6]]), "positions"),  # unsorted row
]


@pytest.mark.parametrize("name,bad,param", BAD, ids=[f"{p}-{i}" for i, (_, _, p) in enumerate(BAD)])
@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_bad_inputs(name, bad, param, impl):
    x = _inputs(_B, _D, _N, _K, length=30)
    x[name] = bad
    with pytest.raises(ValueError, match=f"^{param}:"):
        _call(gapped_scan, x, impl=impl)


# ----------------------------------------------------------------------------------------------------------
# GPU at Vim-S shapes (skipped without CUDA): B = 8, d_inner = 768, N = 16; L = 197 keeping 101 (ToP-ViM's last
# stage at 224 px) and L = 785 keeping 403 (the same schedule at 448 px)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("length,k", [(197, 101), (785, 403)], ids=["L197", "L785"])
def test_gpu_vim_s(length, k, dtype):
    x = _inputs(8, 768, 16, k, length=length, dtype=dtype, device="cuda")
    y = _call(gapped_scan, x, impl="auto")
    ref = _call(gapped_scan_ref, x)
    assert torch.isfinite(y).all()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.float(), ref.float(), atol=atol, rtol=rtol)
    if dtype == torch.float32:
        torch.testing.assert_close(y, _full_length_oracle(x, length), atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@needs_triton
def test_gpu_all_kept_is_dense_scan():
    x = _inputs(8, 768, 16, 197, kind="all", device="cuda")
    dense = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"],
                               delta_bias=x["delta_bias"], delta_softplus=True, impl="parallel")
    torch.testing.assert_close(_call(gapped_scan, x, impl="triton"), dense, atol=1e-5, rtol=1e-4)
