"""Benchmark one FASA decode step (score + top-N + sparse attention) against dense decode attention.

Usage::

    python benchmarks/fasa_decode.py [--device cuda|cpu] [--contexts 8192,16384,32768] [--batches 1,2,3,4]
                                     [--dtype fp16] [--bandwidth TB/s]

Shape: Hq=32 query heads sharing Hkv=8 kv heads, d=128, m=32 dominant dims per query head (16 RoPE chunks),
budgets N = floor(18.9% of T) and 256. Columns: median time of (a) dense decode attention, SDPA over the full
cache with GQA; (b) the float32 torch reference path (partial scores, sort/top-N, gather, attention); (c) the
two Triton kernels (CUDA only). Implementations are called directly, so the public functions' input
validation (a few small reductions and host syncs) is not timed.

Bytes-moved bounds (bandwidth from --bandwidth, or 3.35 TB/s on H100 and 4.8 TB/s on H200; n/a otherwise):
dense reads all of K and V, ``2*B*Hkv*T*d*bytes``; FASA reads the dominant dims of K once per query head,
``B*Hq*T*m*bytes`` (scattered dims are fetched by 32-byte sectors, so real traffic can be higher), plus the
selected K/V rows, ``2*B*Hq*N*d*bytes``. The score scratch and q/out are ignored. ``x/bd`` is
bound time / measured time (1.0 = at the bandwidth roof); ``sdpa/tri`` is the Triton speed-up over dense.
Because selection is per query head, each group of Hq/Hkv heads reads its own K/V rows: at 18.9% the FASA
bound exceeds the dense one for this GQA shape; the 256 budget is where the savings show.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from prunelab.common.timing import benchmark
from prunelab.kernels.partial_score_topk import partial_score_topk_ref
from prunelab.kernels.sparse_decode_attention import sparse_decode_attention_ref

HQ, HKV, D, M = 32, 8, 128, 32
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BANDWIDTH = {"H100": 3.35, "H200": 4.8}  # TB/s
DEFAULTS = {"cuda": ("8192,16384,32768", "1,2,3,4"), "cpu": ("1024,4096", "1,4")}


def _bandwidth(device: str, flag: float | None) -> float | None:
    """Bytes/s from the flag, else from the GPU name, else None."""
    if flag is not None:
        return flag * 1e12
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, tbs in BANDWIDTH.items():
            if key in name:
                return tbs * 1e12
    return None


def _inputs(b, t, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, HQ, D, generator=g, device=device).to(dtype)
    k, v = (torch.randn(b, HKV, t, D, generator=g, device=device).to(dtype) for _ in range(2))
    gc = torch.Generator().manual_seed(0)
    chunks = torch.stack([torch.randperm(D // 2, generator=gc)[: M // 2] for _ in range(HQ)])
    return q, k, v, torch.cat([chunks, chunks + D // 2], dim=1).to(device)


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _bench(b, t, budget, dtype, device, bw, warmup, repeat) -> None:
    q, k, v, dims = _inputs(b, t, dtype, device)
    n = min(budget, t)
    kw = dict(warmup=warmup, repeat=repeat, device=device)

    def dense():
        return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]

    def ref():
        return sparse_decode_attention_ref(q, k, v, partial_score_topk_ref(q, k, dims, budget))

    t_dense = benchmark(dense, **kw).median_s
    t_ref = benchmark(ref, **kw).median_s
    t_tri = err = None
    if device == "cuda":
        from prunelab.kernels.partial_score_topk.triton import partial_score_topk_triton
        from prunelab.kernels.sparse_decode_attention.triton import sparse_decode_attention_triton

        def tri():
            return sparse_decode_attention_triton(q, k, v, partial_score_topk_triton(q, k, dims, budget))

        t_tri = benchmark(tri, **kw).median_s
        err = (tri().float() - ref().float()).abs().max().item()

    elem = q.element_size()
    bytes_dense = 2 * b * HKV * t * D * elem
    bytes_fasa = b * HQ * t * M * elem + 2 * b * HQ * n * D * elem
    bd_dense = bytes_dense / bw if bw else None
    bd_fasa = bytes_fasa / bw if bw else None
    frac_dense = bd_dense / t_dense if bw else None
    frac_tri = bd_fasa / t_tri if bw and t_tri else None
    speedup = t_dense / t_tri if t_tri else None
    ms = lambda x: _fmt(x and x * 1e3, ".3f")
    print(f"{b:>2}{t:>7}{n:>7}{bytes_dense / 1e6:>10.1f}{bytes_fasa / 1e6:>10.1f}{ms(t_dense):>10}{ms(t_ref):>10}"
          f"{ms(t_tri):>11}{ms(bd_dense):>13}{ms(bd_fasa):>12}{_fmt(frac_dense, '.2f'):>11}"
          f"{_fmt(frac_tri, '.2f'):>10}{_fmt(speedup, '.2f'):>10}{_fmt(err, '.1e'):>9}")
    if device == "cuda":
        del q, k, v
        torch.cuda.empty_cache()


def run(args) -> None:
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if args.device == "cuda" else torch.float32)
    bw = _bandwidth(args.device, args.bandwidth)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    bw_s = "n/a (pass --bandwidth)" if bw is None else f"{bw / 1e12:.2f} TB/s"
    print(f"device={name} dtype={dtype} Hq={HQ} Hkv={HKV} d={D} m={M} bandwidth={bw_s} warmup={args.warmup} "
          f"repeat={args.repeat}")
    header = (f"{'B':>2}{'T':>7}{'N':>7}{'dense MB':>10}{'fasa MB':>10}{'sdpa ms':>10}{'ref ms':>10}"
              f"{'triton ms':>11}{'dense-bd ms':>13}{'fasa-bd ms':>12}{'sdpa x/bd':>11}{'tri x/bd':>10}"
              f"{'sdpa/tri':>10}{'max|dO|':>9}")
    print(header)
    print("-" * len(header))
    for t in (int(x) for x in args.contexts.split(",")):
        for budget in (math.floor(0.189 * t), 256):
            for b in (int(x) for x in args.batches.split(",")):
                _bench(b, t, budget, dtype, args.device, bw, args.warmup, args.repeat)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--contexts", default=None, help="comma list of cache lengths T (cpu default: 1024,4096)")
    p.add_argument("--batches", default=None, help="comma list of batch sizes (cuda default: 1,2,3,4)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--bandwidth", type=float, default=None, help="memory bandwidth in TB/s (default by GPU name)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    contexts, batches = DEFAULTS[args.device]
    args.contexts = args.contexts or contexts
    args.batches = args.batches or batches
    for flag, value in (("--contexts", args.contexts), ("--batches", args.batches)):
        if not all(x.strip().isdigit() and int(x) > 0 for x in value.split(",")):
            p.error(f"{flag}: expected a comma list of positive integers, got {value!r}")
    run(args)


if __name__ == "__main__":
    main()
