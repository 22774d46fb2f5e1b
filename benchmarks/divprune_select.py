"""Benchmark DivPrune's greedy max-min selection: our running-min form, an official-style loop, Triton.

Usage::

    python benchmarks/divprune_select.py [--device cpu|cuda] [--shapes llava15,llava16] [--repeat 3]

Per shape (M tokens, keep k, width C; float32 inputs, batch 1 as the official code runs):

* ``ref``: :func:`max_min_diversity_order` with ``impl="torch"``: the float32 distance matmul, then the
  ``O(kM)`` running-min loop.
* ``official-style``: the same matmul, then the official code's loop shape, re-implemented here in our own
  words: at every step gather the rows of all tokens chosen so far and reduce them again, ``O(k^2 M)``.
* ``triton``: the same matmul, then the single-launch kernel (CUDA only).

``select`` columns time the loop alone on a precomputed distance matrix. The bound is the matmul's FLOPs,
``2 M^2 C`` (multiply and add counted separately), over a peak measured here with a square float32 torch
matmul, since the distance matrix needs the whole ``M x M x C`` product before the first pick.
"""

from __future__ import annotations

import argparse

import torch

from prunelab.common.timing import benchmark, check_bench_args
from prunelab.kernels.max_min_diversity import cosine_distance_ref, greedy_max_min_ref, max_min_diversity_order

SHAPES = {  # name -> (M, k, C)
    "llava15": (576, 64, 4096),  # LLaVA-1.5: 576 image tokens, 64 kept
    "llava16": (2880, 320, 4096),  # LLaVA-1.6 anyres: 5 x 576 tokens, about 11 % kept
    "small": (197, 20, 256),  # quick smoke run
}


def official_style_select(dist: torch.Tensor, k: int) -> torch.Tensor:
    """The official loop's cost model on one ``[M, M]`` matrix: re-reduce all chosen rows at each step.

    Returns the picks in order. Semantics follow the paper (first pick by min over ``i != j``; chosen
    tokens masked) so that the output can be checked against ours; only the per-step work differs.
    """
    M = dist.shape[0]
    nn = dist + torch.diag(torch.full((M,), float("inf"), device=dist.device))
    chosen = torch.empty(k, dtype=torch.int64, device=dist.device)
    chosen[0] = nn.amin(dim=0).argmax()
    for t in range(1, k):
        rows = torch.index_select(dist, 0, chosen[:t])  # [t, M]: every chosen row, gathered again
        score = rows.amin(dim=0)
        score[chosen[:t]] = float("-inf")
        chosen[t] = score.argmax()
    return chosen


def measured_peak(device: str, n: int = 2048) -> float:
    """Float32 FLOP/s of an ``n x n x n`` torch matmul on this device (median of a few runs)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    t = benchmark(lambda: a @ b, warmup=2, repeat=5, device=device).median_s
    return 2 * n**3 / t


def _ms(t: float | None) -> str:
    return "n/a" if t is None else f"{t * 1e3:.1f}"


def run(args) -> None:
    device = args.device
    torch.set_grad_enabled(False)
    peak = measured_peak(device)
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device={name} dtype=float32 batch=1 measured fp32 matmul peak={peak / 1e9:.1f} GFLOP/s "
          f"warmup={args.warmup} repeat={args.repeat}")
    header = (f"{'shape':<9}{'M,k,C':<16}{'GFLOP':>7}{'bound ms':>10}{'ref ms':>9}{'offic ms':>10}"
              f"{'triton ms':>10}{'sel ref':>9}{'sel offic':>10}{'sel triton':>11}{'same':>6}")
    print(header)
    print("-" * len(header))
    for shape in args.shapes.split(","):
        _bench_shape(shape, device, peak, args.warmup, args.repeat)


def _bench_shape(shape: str, device: str, peak: float, warmup: int, repeat: int) -> None:
    M, k, C = SHAPES[shape]
    kw = dict(warmup=warmup, repeat=repeat, device=device)
    x = torch.randn(1, M, C, generator=torch.Generator().manual_seed(0)).to(device)
    dist = cosine_distance_ref(x)
    t_ref = benchmark(lambda: max_min_diversity_order(x, k, impl="torch"), **kw).median_s
    t_off = benchmark(lambda: official_style_select(cosine_distance_ref(x)[0], k), **kw).median_s
    s_ref = benchmark(lambda: greedy_max_min_ref(dist, k), **kw).median_s
    s_off = benchmark(lambda: official_style_select(dist[0], k), **kw).median_s
    ours = greedy_max_min_ref(dist, k)[0][0]
    same = torch.equal(ours, official_style_select(dist[0], k))
    t_tri = s_tri = None
    if device == "cuda":
        from prunelab.kernels.max_min_diversity.triton import greedy_max_min_triton

        t_tri = benchmark(lambda: max_min_diversity_order(x, k, impl="triton"), **kw).median_s
        s_tri = benchmark(lambda: greedy_max_min_triton(dist, k), **kw).median_s
        same &= torch.equal(ours, greedy_max_min_triton(dist, k)[0][0])
    flops = 2 * M * M * C
    print(f"{shape:<9}{f'{M},{k},{C}':<16}{flops / 1e9:>7.1f}{_ms(flops / peak):>10}{_ms(t_ref):>9}"
          f"{_ms(t_off):>10}{_ms(t_tri):>10}{_ms(s_ref):>9}{_ms(s_off):>10}{_ms(s_tri):>11}"
          f"{'yes' if same else 'NO':>6}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--shapes", default="llava15,llava16", help=f"comma list of {','.join(SHAPES)}")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    check_bench_args(p, args, SHAPES)
    run(args)


if __name__ == "__main__":
    main()
