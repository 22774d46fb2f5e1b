"""Benchmark attention_received (out + per-key received mass) against dense SDPA and the physical bound.

Usage::

    python benchmarks/attention_received.py [--device cuda|cpu] [--shapes vitb,clipl] [--dtype fp16]

Columns: median time of (a) dense SDPA, output only; (b) the float32 torch reference (out + received,
materialises P); (c) the fused Triton kernels (CUDA only). Lower bounds: bytes moved (q, k, v read; out and
received written) / bandwidth and FLOPs (4*B*H*N*N*D for the forward pass plus 2*B*H*N*N*D for the
recompute pass) / peak. Bandwidth and peak come from a table for H100/H200, or from --bandwidth/--peak.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from prunelab.common.timing import benchmark, check_bench_args
from prunelab.kernels.attention_received import attention_received

SHAPES = {  # name -> (B, H, N, D)
    "vitb": (64, 12, 197, 64),
    "clipl": (16, 16, 577, 64),
    "small": (2, 3, 63, 40),  # quick smoke run on CPU
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# bandwidth in bytes/s; dense peak FLOP/s for 16-bit tensor cores and for plain fp32
DEVICES = {
    "H100": {"bw": 3.35e12, "peak16": 989e12, "peak32": 67e12},
    "H200": {"bw": 4.8e12, "peak16": 989e12, "peak32": 67e12},
}


def _device_specs(device: str, dtype: torch.dtype, bandwidth: float | None, peak: float | None):
    """Return (bytes/s, FLOP/s), each None when unknown."""
    bw = pk = None
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, spec in DEVICES.items():
            if key in name:
                bw = spec["bw"]
                pk = spec["peak32"] if dtype == torch.float32 else spec["peak16"]
    if bandwidth is not None:
        bw = bandwidth * 1e12
    if peak is not None:
        pk = peak * 1e12
    return bw, pk


def _bounds(b, h, n, d, dtype, bw, pk):
    elem = torch.tensor([], dtype=dtype).element_size()
    nbytes = 4 * b * h * n * d * elem + b * h * n * 4  # q, k, v, out + received (fp32)
    flops = 4 * b * h * n * n * d + 2 * b * h * n * n * d
    t_mem = nbytes / bw if bw else None
    t_flop = flops / pk if pk else None
    return nbytes, flops, t_mem, t_flop


def _ms(t: float | None) -> str:
    return "n/a" if t is None else f"{t * 1e3:.3f}"


def run(args) -> None:
    device = args.device
    default_dtype = torch.float16 if device.startswith("cuda") else torch.float32
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype
    bw, pk = _device_specs(device, dtype, args.bandwidth, args.peak)
    on_cuda = device.startswith("cuda")
    dev_name = torch.cuda.get_device_name() if on_cuda else "cpu"
    bw_s = "n/a" if bw is None else f"{bw / 1e12:.2f} TB/s"
    pk_s = "n/a" if pk is None else f"{pk / 1e12:.0f} TFLOP/s"
    print(f"device={dev_name} dtype={dtype} bandwidth={bw_s} peak={pk_s} warmup={args.warmup} "
          f"repeat={args.repeat}")
    header = (f"{'shape':<7}{'B,H,N,D':<16}{'MB moved':>10}{'GFLOP':>9}{'sdpa ms':>11}{'ref ms':>11}"
              f"{'triton ms':>11}{'mem-bd ms':>11}{'flop-bd ms':>11}{'triton/bd':>10}{'max|dR|':>10}")
    print(header)
    print("-" * len(header))
    for name in args.shapes.split(","):
        _bench_shape(name, device, dtype, bw, pk, args.warmup, args.repeat)


def _bench_shape(name, device, dtype, bw, pk, warmup, repeat) -> None:
    b, h, n, d = SHAPES[name]
    on_cuda = device.startswith("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    kw = dict(warmup=warmup, repeat=repeat, device=device)
    t_sdpa = benchmark(lambda: F.scaled_dot_product_attention(q, k, v), **kw).median_s
    t_ref = benchmark(lambda: attention_received(q, k, v, impl="torch"), **kw).median_s
    t_tri = err = None
    if on_cuda:
        t_tri = benchmark(lambda: attention_received(q, k, v, impl="triton"), **kw).median_s
        _, r_tri = attention_received(q, k, v, impl="triton")
        _, r_ref = attention_received(q, k, v, impl="torch")
        err = (r_tri - r_ref).abs().max().item()
    nbytes, flops, t_mem, t_flop = _bounds(b, h, n, d, dtype, bw, pk)
    bounds = [t for t in (t_mem, t_flop) if t is not None]
    ratio = f"{t_tri / max(bounds):.1f}x" if t_tri and bounds else "n/a"
    print(f"{name:<7}{f'{b},{h},{n},{d}':<16}{nbytes / 1e6:>10.1f}{flops / 1e9:>9.1f}{_ms(t_sdpa):>11}"
          f"{_ms(t_ref):>11}{_ms(t_tri):>11}{_ms(t_mem):>11}{_ms(t_flop):>11}{ratio:>10}"
          f"{'n/a' if err is None else f'{err:.1e}':>10}")
    if on_cuda:
        del q, k, v
        torch.cuda.empty_cache()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=default_device, choices=["cuda", "cpu"])
    p.add_argument("--shapes", default="vitb,clipl", help=f"comma list of {','.join(SHAPES)}")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--bandwidth", type=float, default=None, help="memory bandwidth in TB/s (overrides table)")
    p.add_argument("--peak", type=float, default=None, help="peak compute in TFLOP/s (overrides table)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args(argv)
    check_bench_args(p, args, SHAPES)
    run(args)


if __name__ == "__main__":
    main()
