"""Zero-TPrune speed on DeiT-S: measured throughput gain against the FLOPs-ideal gain, and selection cost.

    python benchmarks/zero_tprune_speed.py [--batch 32] [--repeat 7] [--device cpu|cuda]

Random weights are fine for speed (token counts are fixed by the schedule). Prints dense and pruned
throughput, the efficiency (measured gain / ideal gain from analytic FLOPs), the share of the pruned
forward spent in token selection (WPR, VHF/EIR, S-stage, top-k), and the same schedule with random
drop (no attention statistics, fused attention everywhere) to separate selection from the rest.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

import prunelab
from prunelab.common.flops import ViTDims, vit_gflops
from prunelab.common.provenance import markdown_table, provenance
from prunelab.common.timing import benchmark
from prunelab.common.vit import ViTPlan
from prunelab.methods.baselines import RandomDrop
from prunelab.methods.zero_tprune import ZeroTPrune


class TimedSelection:
    """Wraps a ViT method and accumulates wall time spent in its ``select`` calls."""

    def __init__(self, method, sync):
        self.method, self.sync, self.seconds, self.calls = method, sync, 0.0, 0

    def vit_plan(self, dims, layout):
        plan = self.method.vit_plan(dims, layout)
        self.layers = len(plan.requests)

        def select(block, x, stats):
            self.sync()
            t0 = time.perf_counter()
            keep = plan.select(block, x, stats)
            self.sync()
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            return keep

        return ViTPlan(plan.requests, select, plan.tokens_per_block)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--gflops", type=float, default=3.0)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    torch.manual_seed(0)
    model = timm.create_model(a.model, pretrained=False).eval().to(a.device)
    x = torch.randn(a.batch, 3, 224, 224, device=a.device)
    dims = ViTDims.from_timm(model)

    def run(method):
        if method is None:
            return benchmark(lambda: model(x), warmup=2, repeat=a.repeat), vit_gflops(dims)
        with prunelab.apply(model, method) as h:
            return benchmark(lambda: model(x), warmup=2, repeat=a.repeat), vit_gflops(dims, h.plan.tokens_per_block)

    dense_t, dense_g = run(None)
    timed = TimedSelection(ZeroTPrune(gflops=a.gflops), sync)
    ztp_t, ztp_g = run(timed)
    per_forward = timed.seconds / timed.calls * timed.layers  # selection seconds in one forward
    select_share = per_forward / ztp_t.median_s
    rnd_t, rnd_g = run(RandomDrop(gflops=a.gflops))
    rows = []
    for name, t, g in (("dense", dense_t, dense_g), ("Zero-TPrune", ztp_t, ztp_g), ("random drop", rnd_t, rnd_g)):
        ideal = dense_g / g
        gain = t.speedup_over(dense_t)
        rows.append({"method": name, "gflops": g, "median_ms": 1e3 * t.median_s, "iqr_ms": 1e3 * t.iqr_s,
                     "img_per_s": a.batch / t.median_s, "measured_gain": gain, "ideal_gain": ideal,
                     "efficiency": gain / ideal})
    meta = provenance(model=a.model, batch=a.batch, device=a.device, repeat=a.repeat)
    print(markdown_table(rows))
    print(f"\nselection (WPR + VHF/EIR + S-stage + top-k) share of the pruned forward: {100 * select_share:.2f} %"
          f" ({1e3 * per_forward:.1f} ms per forward over {timed.layers} pruning layers)")
    print(f"commit {meta['commit']}, {meta['date_utc']} UTC, {meta['hardware']}, torch {meta['versions']['torch']}")


if __name__ == "__main__":
    main()
