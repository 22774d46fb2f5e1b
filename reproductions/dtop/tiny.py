"""Tiny preset: DToP on the shipped segmentation test-bed (Fashion-MNIST canvases; CPU, offline).

Two shipped segmenters (``prunelab.reproductions.testbeds.segmenter``): the base model (stage A, nothing pruned)
and the same model fine-tuned with DToP active at p0 = 0.9 (stage B). For each p0 the preset runs DToP on both
(without fine-tuning, the paper's setting the official code lacks; and fine-tuned), and random exit at DToP's
measured exit shares, so at the same average GFLOPs. mIoU is over the 11 classes of the whole test set, with a
bootstrap standard error over images and the paired bootstrap difference to random exit. Wall-clock: dense, DToP
and random exit timed interleaved on mixed easy and hard canvases, against the FLOPs bound.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from prunelab.cli import NON_NEGATIVE, POSITIVE, UNIT, existing, int_arg
from prunelab.common.provenance import markdown_table, provenance, write_results
from prunelab.common.timing import interleave, ratio_summary
from prunelab.methods.baselines import RandomExit
from prunelab.methods.dtop import DToP
from prunelab.reproductions.dtop import plots
from prunelab.reproductions.testbeds import segmenter
from prunelab.reproductions.testbeds.scenes import make_canvases
from prunelab.reproductions.testbeds.segmenter import evaluate, miou

P0 = (0.8, 0.9, 0.95, 0.99)
K = 5
COLUMNS = ["model", "method", "p0", "gflops", "gflops_change_%", "miou", "miou_se", "vs_dense", "vs_random",
           "vs_random_se", "miou_easy", "miou_hard", "exit_stage1_%", "exit_stage2_%"]
EXIT_COLUMNS = ["model", "p0", "canvases", "stage1_%", "stage2_%", "last_%", "gflops"]
SPEED_COLUMNS = ["method", "batch", "dense_ms", "ms", "speedup", "speedup_iqr", "bound", "of_bound"]
SPREAD_WARNING = 0.25


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=existing("dir"), default=None,
                        help="Fashion-MNIST folder (default: the Debian package's)")
    parser.add_argument("--n-test", type=int_arg(1, 10_000), default=1000, help="test canvases (half hard)")
    parser.add_argument("--p0", type=UNIT, nargs="+", default=list(P0), help="DToP thresholds to run")
    parser.add_argument("--k", type=NON_NEGATIVE, default=K, help="easy tokens kept per class as context")
    parser.add_argument("--bootstrap", type=POSITIVE, default=300, help="bootstrap resamples of the test images")
    parser.add_argument("--timing-batch", type=POSITIVE, default=8, help="canvases per timed forward (mixed)")
    parser.add_argument("--rounds", type=POSITIVE, default=7, help="interleaved timing rounds")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _bootstrap(conf: torch.Tensor, other: torch.Tensor | None, n: int, seed: int = 0) -> tuple[float, float | None]:
    """Bootstrap SE of mIoU over images, and of the paired difference to ``other`` (same images)."""
    g = torch.Generator().manual_seed(seed)
    base, diff = [], []
    for _ in range(n):
        idx = torch.randint(len(conf), (len(conf),), generator=g)
        m = miou(conf[idx].sum(0))
        base.append(m)
        if other is not None:
            diff.append(m - miou(other[idx].sum(0)))
    return statistics.stdev(base), (statistics.stdev(diff) if other is not None else None)


def random_rates(shares: list[float]) -> tuple[float, ...]:
    """RandomExit's per-stage shares of the *active* tokens from DToP's shares of *all* tokens per stage."""
    rates, left = [], 1.0
    for s in shares[:-1]:
        rates.append(min(1.0, s / left) if left > 0 else 0.0)
        left -= s
    return tuple(rates)


def run(args: argparse.Namespace, out: Path) -> dict:
    return run_tiny(out, data=args.data, n_test=args.n_test, p0s=args.p0, k=args.k, bootstrap=args.bootstrap,
                    timing_batch=args.timing_batch, rounds=args.rounds, progress=not args.no_progress)


def run_tiny(out: str | Path, *, data: str | None = None, n_test: int = 1000, p0s=P0, k: int = K,
             bootstrap: int = 300, timing_batch: int = 8, rounds: int = 7, progress: bool = True) -> dict:
    out = Path(out)
    models = {"base": segmenter.load("base"), "fine-tuned": segmenter.load("dtop")}
    test = make_canvases("test", n_test, seed=1, root=data)
    rows, exits = [], []
    dense = evaluate(models["base"][0], test)
    dense_g = dense["gflops"]

    def row(model: str, name: str, p0, res: dict, random: dict | None = None) -> dict:
        se, diff_se = _bootstrap(res["confusion"], None if random is None else random["confusion"], bootstrap)
        shares = res.get("exit_share", {}).get("all", [0.0, 0.0, 1.0])
        r = {"model": model, "method": name, "p0": p0, "gflops": res["gflops"],
             "gflops_change_%": 100 * (res["gflops"] / dense_g - 1), "miou": res["miou"], "miou_se": se,
             "vs_dense": res["miou"] - dense["miou"], "miou_easy": res["miou_easy"], "miou_hard": res["miou_hard"],
             "exit_stage1_%": 100 * shares[0], "exit_stage2_%": 100 * shares[1]}
        if random is not None:
            r["vs_random"], r["vs_random_se"] = res["miou"] - random["miou"], diff_se
        return r

    rows.append(row("base", "dense", "", dense))
    tuned_dense = evaluate(models["fine-tuned"][0], test)
    rows.append(row("fine-tuned", "dense (no exit)", "", tuned_dense))
    for p0 in sorted(p0s):
        for key, (model, _) in models.items():
            res = evaluate(model, test, DToP(p0=p0, k=k))
            rand = evaluate(model, test, RandomExit(rates=random_rates(res["exit_share"]["all"])))
            for kind, sel in (("easy", ~test.hard), ("hard", test.hard)):
                shares = res["exit_share"][kind]
                exits.append({"model": key, "p0": p0, "canvases": kind, "stage1_%": 100 * shares[0],
                              "stage2_%": 100 * shares[1], "last_%": 100 * shares[2],
                              "gflops": float(res["gflops_per_image"][sel].mean())})
            rows += [row(key, "DToP", p0, res, rand), row(key, "random exit", p0, rand)]
            if progress:
                print(f"  {key} p0={p0}: DToP mIoU {res['miou']:.2f} at {res['gflops']:.4f} GFLOPs, random exit "
                      f"{rand['miou']:.2f} at {rand['gflops']:.4f}", flush=True)

    # Wall-clock at the fine-tune's p0, on the fine-tuned model, batches mixing easy and hard canvases.
    model, info = models["fine-tuned"]
    p0 = info["config"]["finetune_p0"]
    x = test.images[:timing_batch]
    res = evaluate(model, type(test)(*(t[:timing_batch] for t in test)), DToP(p0=p0, k=k))
    configs = {"DToP": DToP(p0=p0, k=k), "random exit": RandomExit(rates=random_rates(res["exit_share"]["all"]))}
    dense_s, times = interleave(model, configs, lambda: model(x), rounds=rounds, warmup=2)
    speed, warnings = [], []
    for name, method in configs.items():
        r = evaluate(model, type(test)(*(t[:timing_batch] for t in test)), method)
        speedup, iqr = ratio_summary(dense_s, times[name])
        bound = model.dense_macs() / 1e9 / r["gflops"]
        if iqr > SPREAD_WARNING * speedup:
            warnings.append(f"{name}: speed-up {speedup:.2f}x with IQR {iqr:.2f} over {rounds} rounds")
        speed.append({"method": name, "batch": len(x), "dense_ms": 1e3 * statistics.median(dense_s),
                      "ms": 1e3 * statistics.median(times[name]), "speedup": speedup, "speedup_iqr": iqr,
                      "bound": bound, "of_bound": (speedup - 1) / (bound - 1) if bound > 1 else float("nan")})
    for w in warnings:
        print(f"WARNING: noisy timing: {w} (the machine was busy? rerun with more --rounds)")

    meta = provenance(
        preset="tiny", model="Segmenter test-bed (timm ViT, 6 blocks, width 96, heads after blocks 2, 3, 5) on "
        "Fashion-MNIST canvases", weights={s: segmenter.WEIGHTS[s].name for s in segmenter.WEIGHTS},
        weights_sha256={s: segmenter.shipped.sha256(segmenter.WEIGHTS[s]) for s in segmenter.WEIGHTS},
        n_test=n_test, test_seed=1, k=k, bootstrap=bootstrap,
        miou="mean IoU (%) over the 11 classes of the whole test set; miou_se and vs_random_se: bootstrap over images "
             "(paired for vs_random)", gflops="mean over the test canvases of each image's MACs / 1e9 (heads "
             "included; the dense model runs no auxiliary head)",
        random_exit="the same stage loop with uniformly random exits at DToP's measured shares per stage",
        timing=f"model fine-tuned at p0={p0}, batch {len(x)} mixed canvases, {rounds} interleaved rounds; speedup: "
               "median of per-round ratios to dense; bound: dense / method MACs on that batch; of_bound: "
               "(speedup - 1) / (bound - 1)", timing_warnings=warnings)
    write_results(out, "table", rows, meta, COLUMNS, title="DToP, tiny preset: mIoU against GFLOPs")
    write_results(out, "exits", exits, meta, EXIT_COLUMNS,
                  title="DToP, tiny preset: share of tokens frozen at each stage, easy and hard canvases")
    write_results(out, "speed", speed, meta, SPEED_COLUMNS, title="DToP, tiny preset: wall-clock against dense")
    fig = plots.curve(rows, f"segmentation test-bed ({n_test} test canvases)")
    fig.savefig(out / "curve.png", dpi=120)
    plt.close(fig)  # written, not shown: a notebook displays the file
    for table, columns in ((rows, COLUMNS), (exits, EXIT_COLUMNS), (speed, SPEED_COLUMNS)):
        print(markdown_table(table, columns), end="\n\n")
    print(f"wrote {out / 'table.md'}, {out / 'exits.md'}, {out / 'speed.md'}, {out / 'curve.png'} (+ JSON)")
    return {"table": rows, "exits": exits, "speed": speed, "provenance": meta}


def default_out() -> Path:
    return Path("runs") / "dtop" / "tiny"
