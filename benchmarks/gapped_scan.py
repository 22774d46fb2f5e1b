"""Benchmark the gapped selective scan (K kept tokens) against the full-length scan over L and the memory bound.

Usage::

    python benchmarks/gapped_scan.py [--device cuda|cpu] [--shapes vims,vims448] [--dtype fp16]

Columns, at ToP-ViM's last stage on Vim-S (B = 8, d_inner = 768, N = 16; 197 tokens keeping 101 at 224 px, 785
keeping 403 at 448 px): median time of (a) the float32 torch reference over the K kept tokens
(``gapped_scan(impl="torch")``, a loop over K); (b) the full-length torch scan over L that the zero-slot and
decay-only paths run (``methods/top_vim/scan.py``'s ``selective_scan_ref`` with ``keep``, loop over L); on CUDA,
(c) ``gapped_scan(impl="triton")`` over K, input checks included (they read ``positions`` and ``gap_delta`` back:
one host sync), (d) the Triton launch alone over K and (e) over all L slots (``positions = arange(L)``: a dense
scan of the same make, what a full-length Triton scan would cost), and (f) mamba-ssm's CUDA ``selective_scan_fn``
over L when mamba_ssm is installed. Lower bound: bytes moved / bandwidth, over K and over L (reads u, delta, z, B, C,
positions and the per-channel constants, writes y). A scan step is a handful of FLOPs per byte, so the memory
bound is the only one printed. Bandwidth comes from a table for H100/H200, or from --bandwidth.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from prunelab.common.timing import benchmark, check_bench_args
from prunelab.kernels.gapped_scan import gapped_scan
from prunelab.methods.top_vim.scan import selective_scan_ref

SHAPES = {  # name -> (B, D, N, L, K)
    "vims": (8, 768, 16, 197, 101),
    "vims448": (8, 768, 16, 785, 403),
    "small": (2, 24, 16, 197, 101),  # quick smoke run on CPU
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s


def _bandwidth(device: str, override: float | None) -> float | None:
    if override is not None:
        return override * 1e12
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, bw in BANDWIDTH.items():
            if key in name:
                return bw
    return None


def _bytes(b, d, n, t, dtype) -> int:
    """Bytes one scan over t tokens moves: u, delta, z, y [B, D, t]; B, C [B, N, t]; positions; A, D, bias, gap."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return (4 * b * d * t + 2 * b * n * t) * elem + 8 * b * t + 4 * (d * n + 3 * d)


def _inputs(b, d, n, length, k, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    positions = torch.stack([torch.randperm(length, generator=g)[:k].sort().values for _ in range(b)])
    dt0 = torch.exp(torch.empty(d).uniform_(-6.9, -2.3, generator=g))  # mamba-ssm's dt init, [1e-3, 1e-1]
    delta_bias = dt0 + torch.log(-torch.expm1(-dt0))
    x = dict(u=torch.randn(b, d, length, generator=g), delta=0.5 * torch.randn(b, d, length, generator=g),
             z=torch.randn(b, d, length, generator=g), B=torch.randn(b, n, length, generator=g),
             C=torch.randn(b, n, length, generator=g))
    full = {name: t.to(device=device, dtype=dtype) for name, t in x.items()}
    idx = positions[:, None, :]
    packed = {name: t.gather(2, idx.expand(b, t.shape[1], k)).to(device=device, dtype=dtype) for name, t in x.items()}
    consts = dict(A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1), D=torch.ones(d), delta_bias=delta_bias,
                  gap_delta=F.softplus(delta_bias))
    consts = {name: t.to(device) for name, t in consts.items()}
    keep = torch.zeros(b, length, dtype=torch.bool).scatter_(1, positions, True).to(device)
    return full, packed, consts, positions.to(device), keep


def _gapped(x, c, positions, impl):
    return gapped_scan(x["u"], x["delta"], c["A"], x["B"], x["C"], positions, c["gap_delta"], D=c["D"], z=x["z"],
                       delta_bias=c["delta_bias"], delta_softplus=True, impl=impl)


def _launch(x, c, positions):
    from prunelab.kernels.gapped_scan.triton import gapped_scan_triton

    return gapped_scan_triton(x["u"], x["delta"], c["A"], x["B"], x["C"], positions, c["gap_delta"], D=c["D"],
                              z=x["z"], delta_bias=c["delta_bias"], delta_softplus=True)


def _mamba_fn():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


def _ms(t: float | None) -> str:
    return "n/a" if t is None else f"{t * 1e3:.3f}"


def run(args) -> None:
    device = args.device
    on_cuda = device.startswith("cuda")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if on_cuda else torch.float32)
    bw = _bandwidth(device, args.bandwidth)
    dev_name = torch.cuda.get_device_name() if on_cuda else "cpu"
    print(f"device={dev_name} dtype={dtype} bandwidth={'n/a' if bw is None else f'{bw / 1e12:.2f} TB/s'} "
          f"warmup={args.warmup} repeat={args.repeat} mamba_ssm={'yes' if _mamba_fn() else 'no'}")
    header = (f"{'shape':<9}{'B,D,N,L,K':<20}{'MB K':>7}{'ref K ms':>10}{'ref L ms':>10}{'tri K ms':>10}"
              f"{'kern K':>9}{'kern L':>9}{'mamba L':>9}{'bd K ms':>9}{'bd L ms':>9}{'kern/bd':>8}{'max|dy|':>9}")
    print(header)
    print("-" * len(header))
    for name in args.shapes.split(","):
        _bench_shape(name, device, dtype, bw, args.warmup, args.repeat)


def _bench_shape(name, device, dtype, bw, warmup, repeat) -> None:
    b, d, n, length, k = SHAPES[name]
    on_cuda = device.startswith("cuda")
    full, packed, c, positions, keep = _inputs(b, d, n, length, k, dtype, device)
    kw = dict(warmup=warmup, repeat=repeat, device=device)
    t_ref = benchmark(lambda: _gapped(packed, c, positions, "torch"), **kw).median_s
    t_ref_l = benchmark(lambda: selective_scan_ref(full["u"], full["delta"], c["A"], full["B"], full["C"], D=c["D"],
                                                   z=full["z"], delta_bias=c["delta_bias"], delta_softplus=True,
                                                   keep=keep), **kw).median_s
    t_tri = t_kern = t_kern_l = t_mamba = err = None
    if on_cuda:
        dense_pos = torch.arange(length, device=device).repeat(b, 1)
        t_tri = benchmark(lambda: _gapped(packed, c, positions, "triton"), **kw).median_s
        t_kern = benchmark(lambda: _launch(packed, c, positions), **kw).median_s
        t_kern_l = benchmark(lambda: _launch(full, c, dense_pos), **kw).median_s
        err = (_gapped(packed, c, positions, "triton").float() - _gapped(packed, c, positions, "torch").float())
        err = err.abs().max().item()
        mamba = _mamba_fn()
        if mamba is not None:
            t_mamba = benchmark(lambda: mamba(full["u"], full["delta"], c["A"], full["B"], full["C"], c["D"],
                                              z=full["z"], delta_bias=c["delta_bias"], delta_softplus=True),
                                **kw).median_s
    nbytes_k, nbytes_l = _bytes(b, d, n, k, dtype), _bytes(b, d, n, length, dtype)
    bd_k = nbytes_k / bw if bw else None
    bd_l = nbytes_l / bw if bw else None
    ratio = f"{t_kern / bd_k:.0f}x" if t_kern and bd_k else "n/a"
    print(f"{name:<9}{f'{b},{d},{n},{length},{k}':<20}{nbytes_k / 1e6:>7.1f}{_ms(t_ref):>10}{_ms(t_ref_l):>10}"
          f"{_ms(t_tri):>10}{_ms(t_kern):>9}{_ms(t_kern_l):>9}{_ms(t_mamba):>9}{_ms(bd_k):>9}{_ms(bd_l):>9}{ratio:>8}"
          f"{'n/a' if err is None else f'{err:.1e}':>9}")
    if on_cuda:
        del full, packed
        torch.cuda.empty_cache()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=default_device, choices=["cuda", "cpu"])
    p.add_argument("--shapes", default="vims,vims448", help=f"comma list of {','.join(SHAPES)}")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--bandwidth", type=float, default=None, help="memory bandwidth in TB/s (overrides table)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args(argv)
    check_bench_args(p, args, SHAPES)
    run(args)


if __name__ == "__main__":
    main()
