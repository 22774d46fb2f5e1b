"""Tiny preset: Zero-TPrune on a small ViT trained here on Fashion-MNIST (CPU, offline, minutes).

The ViT sees 56 x 56 images in 4 x 4 patches, so its token grid is DeiT's 14 x 14 (197 tokens with CLS).
It prints the paper's table (GFLOPs, throughput, top-1 for dense, Zero-TPrune and random drop at the
same GFLOPs, plus the one-iteration ablation) at the paper's -34.7 % FLOPs point, sweeps several
budgets for the curve, and writes JSON, Markdown and a PNG with provenance.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prunelab.cli import POSITIVE, RATIO, existing, int_arg
from prunelab.common.provenance import markdown_table, provenance, write_results
from prunelab.common.validate import check_int
from prunelab.methods.zero_tprune.method import PAPER_FLOPS_REDUCTION
from prunelab.reproductions.zero_tprune.data import load_fashion_mnist, preprocess
from prunelab.reproductions.zero_tprune.evaluate import (
    VARIANTS,
    model_gflops,
    standard_error,
    throughput,
    top1,
)
from prunelab.reproductions.zero_tprune.tiny_vit import load_or_train_tiny_vit

CURVE_FRACTIONS = (0.9, 0.8, 1 - PAPER_FLOPS_REDUCTION, 0.55, 0.45)  # of dense GFLOPs
FASHION_TEST = 10_000  # images in Fashion-MNIST's test split
TABLE_COLUMNS = ["method", "gflops", "flops_change_%", "throughput_img_s", "throughput_change_%", "top1", "top1_se",
                 "top1_change"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=existing("dir"), default=None,
                        help="Fashion-MNIST folder (default: the Debian package's)")
    parser.add_argument("--n-eval", type=int_arg(1, FASHION_TEST), default=2000,
                        help=f"test images to evaluate (1..{FASHION_TEST})")
    parser.add_argument("--batch-size", type=POSITIVE, default=250, help="evaluation batch size")
    parser.add_argument("--throughput-batch", type=POSITIVE, default=64, help="batch size for throughput")
    parser.add_argument("--fractions", type=RATIO, nargs="+", default=list(CURVE_FRACTIONS),
                        help="FLOPs budgets for the curve, as fractions of dense, in (0, 1]")
    parser.add_argument("--cache-dir", default=None, help="where the trained tiny ViT is cached")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace, out: Path) -> dict:
    return run_tiny(out, data=args.data, n_eval=args.n_eval, batch_size=args.batch_size,
                    throughput_batch=args.throughput_batch, fractions=args.fractions, cache_dir=args.cache_dir,
                    progress=not args.no_progress)


def run_tiny(out: str | Path, *, data: str | None = None, n_eval: int = 2000, batch_size: int = 250,
             throughput_batch: int = 64, fractions=CURVE_FRACTIONS, cache_dir: str | None = None,
             progress: bool = True) -> dict:
    """Run the tiny preset; returns ``{"table", "curve", "provenance"}`` and writes them into ``out``."""
    out = Path(out)
    model, info = load_or_train_tiny_vit(cache_dir=cache_dir, data_root=data, progress=progress)
    model.eval()
    images, labels = load_fashion_mnist("test", data)
    n_eval = check_int(n_eval, "n_eval", low=1, high=len(labels))
    x, y = preprocess(images[:n_eval]), labels[:n_eval]
    batches = list(zip(x.split(batch_size), y.split(batch_size)))
    dense_g = model_gflops(model, None)

    curve = []
    correct, total = top1(model, None, batches, desc="dense", progress=progress)
    curve.append({"method": "dense", "fraction": 1.0, "gflops": dense_g, "top1": 100 * correct / total,
                  "top1_se": standard_error(correct, total)})
    for fraction in fractions:
        for key in ("zero_tprune", "random_drop", "one_iteration"):
            variant = VARIANTS[key]
            method = variant.method(fraction * dense_g)
            correct, total = top1(model, method, batches, desc=f"{variant.name} @ {fraction:.2f}", progress=progress)
            curve.append({"method": variant.name, "fraction": fraction, "gflops": model_gflops(model, method),
                          "top1": 100 * correct / total, "top1_se": standard_error(correct, total)})

    # The paper's table at its operating point, with measured throughput.
    point = 1 - PAPER_FLOPS_REDUCTION
    tput_x = x[:throughput_batch]
    dense_tput = throughput(model, None, tput_x)
    table = []
    for key in ("dense", "zero_tprune", "random_drop", "one_iteration"):
        variant = VARIANTS[key]
        row = next(r for r in curve if r["method"] == variant.name
                   and (key == "dense" or abs(r["fraction"] - point) < 1e-9))
        tput = dense_tput if key == "dense" else throughput(model, variant.method(point * dense_g), tput_x)
        table.append({"method": variant.name, "gflops": row["gflops"],
                      "flops_change_%": 100 * (row["gflops"] / dense_g - 1), "throughput_img_s": tput,
                      "throughput_change_%": 100 * (tput / dense_tput - 1), "top1": row["top1"],
                      "top1_se": row["top1_se"], "top1_change": row["top1"] - curve[0]["top1"]})

    meta = provenance(preset="tiny", model="tiny ViT (timm VisionTransformer) trained on Fashion-MNIST",
                      model_info={k: v for k, v in info.items() if k != "config"} | {"config": str(info.get("config"))},
                      n_eval=len(y), throughput_batch=len(tput_x), operating_point=f"{point:.3f} x dense GFLOPs")
    write_results(out, "table", table, meta, TABLE_COLUMNS,
                  title="Zero-TPrune, tiny preset: the paper's -34.7 % FLOPs point")
    write_results(out, "curve", curve, meta, ["method", "fraction", "gflops", "top1", "top1_se"],
                  title="Zero-TPrune, tiny preset: budget curve")
    from prunelab.reproductions.zero_tprune.plots import budget_curve

    fig = budget_curve(curve, title=f"Tiny ViT on Fashion-MNIST ({len(y)} test images)")
    fig.savefig(out / "curve.png", dpi=120)
    print(markdown_table(table, TABLE_COLUMNS))
    print(f"\nwrote {out / 'table.md'}, {out / 'curve.md'}, {out / 'curve.png'} (+ JSON)")
    return {"table": table, "curve": curve, "provenance": meta}


def default_out() -> Path:
    return Path("runs") / "zero_tprune" / "tiny"


