"""ToP-ViM's wall-clock against the dense Vim and against the FLOPs bound, at Vim-S's shape (or Vim-T's, or
PlainMamba-L1/L2/L3's).

    python benchmarks/top_vim_speed.py [--model vim_s] [--batch 32] [--rounds 5] [--scan stepped] [--device cpu|cuda]

Random weights (timing does not depend on them). The official schedule (after blocks 5, 10, 15 at keep ratio 0.8:
197 -> 157 -> 125 -> 101 tokens) under each alignment, timed interleaved with the dense forward. ``bound`` = dense
MACs / the method's MACs (:mod:`prunelab.methods.top_vim.flops`); ``of_bound`` = (speed-up - 1) / (bound - 1). The
aligned modes walk every slot in plain PyTorch: their bound is what a scan that skips the pruned slots' work
(``kernels/gapped_scan``, GPU) could reach, not what this path can.

PlainMamba (``--model plainmamba_l1`` ...): the full preset's default schedule (the Vim-S blocks scaled to the depth
at keep ratio 0.6) under ``gapped`` and ``none``, both computed on the kept tokens; the bound counts MACs with
:func:`~prunelab.methods.top_vim.flops.plain_mamba_macs` (prunelab's scan count), the conv, ``x_proj`` and ``dt_proj``
on every grid cell as the mixer computes them.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from prunelab.common.timing import interleave, ratio_summary
from prunelab.methods.top_vim import (
    PlainMamba,
    ToPViM,
    plain_mamba_l1,
    plain_mamba_l2,
    plain_mamba_l3,
    vim_small,
    vim_tiny,
)
from prunelab.methods.top_vim.scan import IMPLS
from prunelab.reproductions.top_vim.full import PLAIN_KEEP_RATIO, gflops

MODELS = {"vim_s": vim_small, "vim_t": vim_tiny, "plainmamba_l1": plain_mamba_l1, "plainmamba_l2": plain_mamba_l2,
          "plainmamba_l3": plain_mamba_l3}


def macs(model, method=None, scan_convention: str = "prunelab") -> float:
    """Per-image MACs of ``model`` under ``method`` (None: dense); the full preset's count."""
    return gflops(model, method, scan_convention) * 1e9


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="vim_s")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--scan", choices=IMPLS, default="stepped", help="selective-scan implementation")
    p.add_argument("--alignments", nargs="+", default=None,
                   help="default: none, zero_slot, decay_only for Vim; none, gapped for PlainMamba")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = MODELS[args.model](scan_impl=args.scan).eval().to(args.device)
    plain = isinstance(model, PlainMamba)
    alignments = args.alignments or (["none", "gapped"] if plain else ["none", "zero_slot", "decay_only"])
    x = torch.randn(args.batch, 3, 224, 224, device=args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def run():
        model(x)
        sync()

    configs = {a: ToPViM(alignment=a, **({"keep_ratio": PLAIN_KEEP_RATIO} if plain else {})) for a in alignments}
    dense_s, times = interleave(model, configs, run, rounds=args.rounds, warmup=1)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{args.model}, batch {args.batch}, scan {args.scan}, {name}, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds; dense {1e3 * statistics.median(dense_s):.0f} ms "
          f"({macs(model) / 1e9:.2f} GMACs per image)")
    rows = []
    for a, method in configs.items():
        speedup, iqr = ratio_summary(dense_s, times[a])
        bound = macs(model) / macs(model, method)
        rows.append({"alignment": a, "ms": 1e3 * statistics.median(times[a]), "speedup": speedup, "iqr": iqr,
                     "bound": bound, "of_bound": (speedup - 1) / (bound - 1)})
        fvcore = ""
        if plain:  # the scan counted as the release counts it (9 N d_inner per step): a scan-heavier bound
            rows[-1]["bound_fvcore"] = macs(model, None, "fvcore") / macs(model, method, "fvcore")
            fvcore = f"  (fvcore-count bound {rows[-1]['bound_fvcore']:.3f})"
        print(f"  {a:10s} {rows[-1]['ms']:8.0f} ms  speed-up {speedup:.3f} (IQR {iqr:.3f})  bound {bound:.3f}  "
              f"of bound {rows[-1]['of_bound']:.2f}{fvcore}")
    return rows


if __name__ == "__main__":
    main()
