"""A small timing harness: warm-up, repeated runs, median, ratio to a baseline.

On CUDA it times with CUDA events around each call (so asynchronous launches are counted); on CPU it
uses ``time.perf_counter``. Every number a benchmark prints comes from :func:`benchmark`, or, when a pruned model
is compared with its dense self, from :func:`interleave`, which alternates them so that a busy spell of a shared
machine slows both alike; :func:`ratio_summary` turns its per-round ratios into a median and an IQR.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

import prunelab


@dataclass(frozen=True)
class Timing:
    """Wall-clock times of repeated calls, in seconds."""

    times_s: tuple[float, ...] = field(repr=False)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    @property
    def iqr_s(self) -> float:
        """Inter-quartile range: how noisy the measurement was."""
        if len(self.times_s) < 4:
            return max(self.times_s) - min(self.times_s)
        q = statistics.quantiles(self.times_s, n=4)
        return q[2] - q[0]

    def speedup_over(self, baseline: Timing) -> float:
        """``baseline.median / self.median``: above 1 means faster than the baseline."""
        return baseline.median_s / self.median_s

    def __str__(self) -> str:
        return f"{self.median_s * 1e3:.3f} ms (median of {len(self.times_s)}, IQR {self.iqr_s * 1e3:.3f} ms)"


def benchmark(fn: Callable[[], object], *, warmup: int = 3, repeat: int = 10, device: str | None = None) -> Timing:
    """Time ``fn()``.

    Args:
        fn: the work to time, with its inputs bound (``functools.partial`` or a lambda).
        warmup: untimed calls first (allocator, caches, Triton compilation).
        repeat: timed calls.
        device: ``"cuda"`` to time with CUDA events; default: CUDA if available.
    """
    if warmup < 0 or repeat < 1:
        raise ValueError(f"warmup must be >= 0 and repeat >= 1, got warmup={warmup}, repeat={repeat}")
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            if use_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
    return Timing(tuple(times))


def interleave(model, configs: Mapping, run: Callable[[], object], *, rounds: int, warmup: int = 1,
               progress=None) -> tuple[list[float], dict]:
    """Times ``run()`` (one forward of ``model``) dense and under every method of ``configs`` (``{key: method}``),
    interleaved: each round runs dense, then each configuration once, so a busy spell slows them alike. No
    gradients are recorded. Returns (dense times, ``{key: times}``) in seconds."""

    def timed(method):
        if method is None:
            t0 = time.perf_counter()
            run()
            return time.perf_counter() - t0
        with prunelab.apply(model, method):
            t0 = time.perf_counter()
            run()
            return time.perf_counter() - t0

    with torch.no_grad():
        for _ in range(warmup):
            timed(None)
        times, dense = {key: [] for key in configs}, []
        for r in range(rounds):
            dense.append(timed(None))
            for key, method in configs.items():
                times[key].append(timed(method))
            if progress:
                progress(r + 1, rounds)
    return dense, times


def ratio_summary(dense: list[float], times: list[float]) -> tuple[float, float]:
    """Median and IQR of the per-round speed-ups ``dense[r] / times[r]`` of :func:`interleave`'s output."""
    ratios = [d / t for d, t in zip(dense, times)]
    if len(ratios) < 4:
        return statistics.median(ratios), max(ratios) - min(ratios)
    q = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), q[2] - q[0]


def check_bench_args(parser, args, shapes) -> None:
    """Shared checks of the kernel benchmarks' ``--shapes`` (comma list) and ``--device`` options."""
    unknown = [s for s in args.shapes.split(",") if s not in shapes]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; choose from {list(shapes)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
