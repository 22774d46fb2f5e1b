"""Benchmark image_query_received (VisionDrop's LLM-stage score) against materialising the probability block.

VisionDrop ("Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment", arXiv 2506.22283)
scores each image token inside the language model by the attention it receives from the image's own queries,
each query's softmax running over all the keys it sees. Usage::

    python benchmarks/image_query_received.py [--device cuda|cpu] [--repeats 10] [--shapes llava16,llava16_gqa]

Per shape, three ways to the same ``[B, n_I]`` score:

* ``dense``: the straightforward way, one float32 ``[Hq, n_I, S]`` logits/probability block per sample
  (keys repeated over the query heads of a group), masked softmax, mean over heads and image queries.
* ``torch``: :func:`image_query_received` with ``impl="torch"``, the reference: the same block in query chunks
  of 256 rows, so at most ``Hq * 256 * S`` floats at a time.
* ``triton``: ``impl="triton"`` (CUDA only): a log-sum-exp pass and a recompute pass over the image columns,
  nothing of size ``n_I * S`` in memory.

The methods run interleaved (one call of each per round, after a warm-up) so that clock and cache drift hit
them alike; each column is the median over rounds with the inter-quartile range (IQR) after ``+-``.
``block MB`` is the float32 block of image-query probabilities, ``B * Hq * n_I * S * 4`` bytes, that the
kernel never forms. On CUDA ``peak MB`` is the peak of allocated memory during one call beyond the inputs.
"""

from __future__ import annotations

import argparse
import math

import torch

from prunelab.common.timing import Timing, benchmark, check_bench_args
from prunelab.kernels.image_query_received import image_query_received

SHAPES = {  # name -> (B, Hq, Hkv, S, n_I, d); the image starts after a short system prompt
    "llava16": (1, 32, 32, 3300, 2880, 128),  # LLaVA-NeXT-7B (Vicuna, MHA), anyres 5 x 576 image tokens
    "llava16_gqa": (1, 32, 8, 3300, 2880, 128),  # the same with 8 key heads (grouped-query attention)
    "small": (1, 8, 8, 700, 576, 64),  # CPU-sized
    "small_gqa": (2, 8, 2, 700, 576, 64),  # CPU-sized, two samples, GQA
}
DEFAULT_SHAPES = {"cuda": "llava16,llava16_gqa", "cpu": "small,small_gqa"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGE_START = 35  # system prompt rows before the image


def dense_block(q, k, valid, start, end, scale, causal=True) -> torch.Tensor:
    """The score by materialising each sample's float32 ``[Hq, n_I, S]`` probability block in one go."""
    B, hq, S, _ = q.shape
    n = (end - start).tolist()
    out = torch.zeros(B, max(n), dtype=torch.float32, device=q.device)
    cols = torch.arange(S, device=q.device)
    for b, (s0, e0) in enumerate(zip(start.tolist(), end.tolist())):
        kb = k[b].float().repeat_interleave(hq // k.shape[1], dim=0)
        logits = torch.einsum("hid,hjd->hij", q[b, :, s0:e0].float(), kb) * scale
        visible = valid[b][None, :] & (cols[None, :] <= cols[s0:e0, None] if causal else True)
        probs = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out[b, : e0 - s0] = probs[:, :, s0:e0].mean(dim=(0, 1))
    return out


def _inputs(shape, device, dtype):
    b, hq, hkv, s, n_img, d = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(b, hq, s, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(b, hkv, s, d, generator=g).to(device=device, dtype=dtype)
    valid = torch.ones(b, s, dtype=torch.bool)
    start = torch.full((b,), IMAGE_START, dtype=torch.int64)
    end = start + n_img
    for i in range(1, b):  # later samples: left padding and a shorter image, the prompt ending at S
        pad = 17 * i
        valid[i, :pad] = False
        start[i] = pad + IMAGE_START
        end[i] = start[i] + n_img - 64 * i
    return q, k, valid.to(device), start.to(device), end.to(device)


def _peak_mb(fn, device) -> float | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e6


def _cell(t: Timing | None) -> str:
    return "n/a" if t is None else f"{t.median_s * 1e3:.2f} +-{t.iqr_s * 1e3:.2f}"


def run(args) -> None:
    device = args.device
    on_cuda = device.startswith("cuda")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if on_cuda else torch.float32)
    dev_name = torch.cuda.get_device_name() if on_cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device={dev_name} dtype={dtype} causal={not args.non_causal} warmup={args.warmup} "
          f"repeats={args.repeats} (interleaved; ms as median +-IQR)")
    header = (f"{'shape':<12}{'B,Hq,Hkv,S,n_I,d':<24}{'block MB':>10}{'dense ms':>18}{'torch ms':>18}"
              f"{'triton ms':>18}{'dense/kern':>11}{'peak MB dn/ref/tri':>20}{'max|diff|':>11}")
    print(header)
    print("-" * len(header))
    for name in (args.shapes or DEFAULT_SHAPES[device]).split(","):
        _bench_shape(name, device, dtype, args)
        if on_cuda:  # the shape's tensors are gone with its frame
            torch.cuda.empty_cache()


def _bench_shape(name, device, dtype, args) -> None:
    shape = SHAPES[name]
    on_cuda = device.startswith("cuda")
    q, k, valid, start, end = _inputs(shape, device, dtype)
    scale = 1.0 / math.sqrt(shape[-1])
    causal = not args.non_causal
    fns = {
        "dense": lambda: dense_block(q, k, valid, start, end, scale, causal),
        "torch": lambda: image_query_received(q, k, valid, start, end, scale=scale, causal=causal, impl="torch"),
    }
    if on_cuda:
        fns["triton"] = lambda: image_query_received(q, k, valid, start, end, scale=scale, causal=causal,
                                                     impl="triton")
    kernel = "triton" if on_cuda else "torch"
    with torch.inference_mode():
        results = {m: fn() for m, fn in fns.items()}
    err = max((results[m] - results["dense"]).abs().max().item() for m in fns if m != "dense")
    peaks = {m: _peak_mb(fn, device) for m, fn in fns.items()}
    for _ in range(args.warmup):
        for fn in fns.values():
            benchmark(fn, warmup=0, repeat=1, device=device)
    times = {m: [] for m in fns}
    for _ in range(args.repeats):  # interleaved rounds
        for m, fn in fns.items():
            times[m].extend(benchmark(fn, warmup=0, repeat=1, device=device).times_s)
    timing = {m: Timing(tuple(ts)) for m, ts in times.items()}
    n_img = (end - start).tolist()
    block_mb = sum(shape[1] * n * shape[3] * 4 for n in n_img) / 1e6
    ratio = timing[kernel].speedup_over(timing["dense"])
    peak = "n/a" if not on_cuda else "/".join(f"{peaks[m]:.0f}" for m in ("dense", "torch", "triton"))
    dims = ",".join(str(x) for x in shape)
    print(f"{name:<12}{dims:<24}{block_mb:>10.1f}{_cell(timing['dense']):>18}{_cell(timing['torch']):>18}"
          f"{_cell(timing.get('triton')):>18}{f'{ratio:.2f}x':>11}{peak:>20}{err:>11.1e}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=default_device, choices=["cuda", "cpu"])
    p.add_argument("--shapes", default=None,
                   help=f"comma list of {','.join(SHAPES)}; default: {DEFAULT_SHAPES}[device]")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--non-causal", action="store_true", help="bidirectional image queries (ablation)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    if args.warmup < 0 or args.repeats < 1:
        p.error(f"--warmup must be >= 0 and --repeats >= 1, got {args.warmup}, {args.repeats}")
    shapes = args.shapes
    args.shapes = shapes or DEFAULT_SHAPES[args.device]
    check_bench_args(p, args, SHAPES)
    args.shapes = shapes
    run(args)


if __name__ == "__main__":
    main()
