"""Tiny preset: ToP-ViM on the shipped vision-Mamba test-bed (a Vim trained on Fashion-MNIST; CPU, offline).

The paper's three claims, tested at its schedule scaled to the test-bed's 8 blocks (after blocks 2, 3, 5 at keep
ratio 0.8: 197 -> 157 -> 125 -> 101 tokens):

1. naive pruning (the tokens physically removed, EViT-style) collapses without fine-tuning;
2. the pruning-aware hidden-state alignment recovers most of that loss;
3. after the same short fine-tune, ToP-ViM beats naive pruning.

Rows: the shipped base model zero-shot (dense; naive removal with ToP-ViM's importance, i.e. ToP-ViM without
alignment; ToP-ViM with ``zero_slot``, ``decay_only`` and ``gapped``; the official code's path; the flipped-importance
bug; random tokens with and without alignment), and four fine-tuned copies of it
(:func:`prunelab.reproductions.testbeds.vim.finetune_methods`: dense, naive, ToP-ViM, random; each fine-tuned with
its method applied on the same images).
Top-1 on the first ``n_test`` test images with its binomial SE, the paired difference to dense and to random tokens
at the same budget and alignment, GFLOPs per image (:mod:`prunelab.methods.top_vim.flops`). A zero-shot budget curve
over keep ratios, and wall-clock against dense, interleaved, with the FLOPs bound.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from prunelab.cli import POSITIVE, UNIT, existing, int_arg
from prunelab.common.provenance import markdown_table, provenance, write_results
from prunelab.common.timing import interleave, ratio_summary
from prunelab.methods.baselines import RandomVim
from prunelab.methods.top_vim import ToPViM, dense_macs, top_vim_macs
from prunelab.reproductions.testbeds import shipped, vim
from prunelab.reproductions.testbeds.fashion import load_fashion_mnist, preprocess
from prunelab.reproductions.zero_tprune.evaluate import paired_difference, standard_error

RATIOS = (0.9, 0.8, 0.6, 0.4)
POINT = 0.8  # the official keep ratio
COLUMNS = ["model", "method", "alignment", "keep_ratio", "gflops", "gflops_change_%", "top1", "top1_se", "vs_dense",
           "vs_dense_se", "vs_random", "vs_random_se"]
CURVE_COLUMNS = ["method", "alignment", "keep_ratio", "gflops", "top1", "top1_se", "vs_random", "vs_random_se"]
SPEED_COLUMNS = ["method", "alignment", "batch", "dense_ms", "ms", "speedup", "speedup_iqr", "bound", "of_bound"]
CLAIM_COLUMNS = ["claim", "measured", "holds"]
SPREAD_WARNING = 0.25


def variants(keep_ratio: float) -> dict[str, object]:
    """The zero-shot methods at one keep ratio, by row name."""
    return {"naive removal (ToP scores)": ToPViM(keep_ratio=keep_ratio, alignment="none"),
            "ToP-ViM": ToPViM(keep_ratio=keep_ratio),
            "ToP-ViM decay_only": ToPViM(keep_ratio=keep_ratio, alignment="decay_only"),
            "ToP-ViM gapped": ToPViM(keep_ratio=keep_ratio, alignment="gapped"),
            "random, removed": RandomVim(keep_ratio=keep_ratio, alignment="none"),
            "random, aligned": RandomVim(keep_ratio=keep_ratio)}


def random_twin(method) -> RandomVim:
    """Random tokens at ``method``'s budget and alignment."""
    return RandomVim(keep_ratio=method.keep_ratio, blocks=method.blocks, alignment=method.alignment)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=existing("dir"), default=None,
                        help="Fashion-MNIST folder (default: the Debian package's)")
    parser.add_argument("--n-test", type=int_arg(1, 10_000), default=1000, help="test images (the first N)")
    parser.add_argument("--ratios", type=UNIT, nargs="+", default=list(RATIOS), help="keep ratios of the curve")
    parser.add_argument("--timing-batch", type=POSITIVE, default=32, help="images per timed forward")
    parser.add_argument("--rounds", type=POSITIVE, default=7, help="interleaved timing rounds")
    parser.add_argument("--no-progress", action="store_true", help="hide progress lines")


def run(args: argparse.Namespace, out: Path) -> dict:
    return run_tiny(out, data=args.data, n_test=args.n_test, ratios=args.ratios, timing_batch=args.timing_batch,
                    rounds=args.rounds, progress=not args.no_progress)


def run_tiny(out: str | Path, *, data: str | None = None, n_test: int = 1000, ratios=RATIOS, timing_batch: int = 32,
             rounds: int = 7, progress: bool = True) -> dict:
    out = Path(out)
    models = {stage: vim.load(stage) for stage in vim.WEIGHTS}
    base = models["base"][0]
    images, labels = load_fashion_mnist("test", data)
    raw, y = images[:n_test], labels[:n_test]
    dense_g = dense_macs(base) / 1e9
    cache: dict[tuple[str, object], torch.Tensor] = {}

    def hits(stage: str, method) -> torch.Tensor:
        key = (stage, method)
        if key not in cache:
            cache[key] = vim.hits(models[stage][0], raw, y, method)
        return cache[key]

    def row(stage: str, name: str, method, versus_random: bool = True) -> dict:
        h = hits(stage, method)
        correct, total = int(h.sum()), h.numel()
        g = dense_g if method is None else top_vim_macs(models[stage][0], method) / 1e9
        r = {"model": stage, "method": name, "alignment": getattr(method, "alignment", ""),
             "keep_ratio": getattr(method, "keep_ratio", 1.0), "gflops": g, "gflops_change_%": 100 * (g / dense_g - 1),
             "top1": 100 * correct / total, "top1_se": standard_error(correct, total)}
        if method is not None:
            r["vs_dense"], r["vs_dense_se"] = paired_difference(h, hits("base", None))
            if versus_random and not isinstance(method, RandomVim):
                r["vs_random"], r["vs_random_se"] = paired_difference(h, hits(stage, random_twin(method)))
        if progress:
            print(f"  {stage:9s} {name:28s} top-1 {r['top1']:6.2f} at {g:.4f} GFLOPs", flush=True)
        return r

    # The paper's setting: every method at the official keep ratio, zero-shot and fine-tuned.
    at = variants(POINT)
    table = [row("base", "dense", None)]
    table += [row("base", name, m) for name, m in at.items()]
    table.append(row("base", "official code path", ToPViM.official()))
    table.append(row("base", "ToP-ViM, flipped importance", ToPViM(importance_source="official_bwd_unflipped")))
    names = {"ft_dense": "dense", "ft_naive": "naive removal (ToP scores)", "ft_top": "ToP-ViM",
             "ft_random": "random, aligned"}
    tuned = {stage: (names[stage], method) for stage, method in vim.finetune_methods().items()}
    for stage, (name, method) in tuned.items():
        table.append(row(stage, name, method, versus_random=False))
    # the zero_slot fine-tune run with the packed fast path (a slightly different pruned-slot step)
    table.append(row("ft_top", "ToP-ViM gapped", ToPViM(alignment="gapped"), versus_random=False))
    ft = {r["model"]: r for r in table if r["model"] != "base" and r["method"] == names[r["model"]]}
    for stage in ("ft_naive", "ft_top"):  # fine-tuned against the random baseline fine-tuned the same way
        ft[stage]["vs_random"], ft[stage]["vs_random_se"] = paired_difference(
            hits(stage, tuned[stage][1]), hits("ft_random", tuned["ft_random"][1]))

    # Zero-shot budget curve on the base model.
    curve = [table[0]]  # dense
    for ratio in sorted(set(ratios) | {POINT}, reverse=True):
        for name, method in variants(ratio).items():
            if name != "ToP-ViM decay_only":
                curve.append(row("base", name, method))

    claims = _claims(table, paired_difference(hits("ft_top", tuned["ft_top"][1]),
                                              hits("ft_naive", tuned["ft_naive"][1])))
    timing_x = preprocess(raw[:timing_batch])
    speed, warnings = _speed(base, timing_x, rounds)
    sha = {s: shipped.sha256(vim.WEIGHTS[s]) for s in vim.WEIGHTS}
    meta = provenance(
        preset="tiny", model="Vim test-bed (prunelab VisionMamba: width 96, depth 8, d_state 8, 197 tokens with the "
        "CLS in the middle) trained on Fashion-MNIST", weights={s: p.name for s, p in vim.WEIGHTS.items()},
        weights_sha256=sha, base_test_top1=models["base"][1].get("test_top1"),
        finetune={s: {"method": models[s][1].get("method"), "images": models[s][1].get("images_seen"),
                      "lr": models[s][1].get("lr")} for s in vim.WEIGHTS if s != "base"},
        n_test=len(y), schedule=f"after blocks {ToPViM().prune_blocks(len(base.layers))} (the official 5, 10, 15 of "
        "24 scaled to 8 blocks) at keep ratio 0.8 unless stated",
        top1="% of the first n_test Fashion-MNIST test images; top1_se binomial; vs_dense, vs_random: paired "
             "differences in points on the same images with their SE (fine-tuned rows: against the base dense model "
             "and the random-token model fine-tuned the same way)",
        gflops="analytic MACs per image / 1e9; aligned modes are charged the scans' visits to pruned slots",
        timing=f"batch {len(timing_x)}, {rounds} interleaved rounds; speedup: median of per-round ratios to "
               "dense; bound: dense / method MACs; of_bound: (speedup - 1) / (bound - 1)", timing_warnings=warnings)
    write_results(out, "table", table, meta, COLUMNS, title="ToP-ViM, tiny preset: top-1 at the official schedule")
    write_results(out, "curve", curve, meta, CURVE_COLUMNS, title="ToP-ViM, tiny preset: zero-shot top-1 against "
                  "GFLOPs")
    write_results(out, "claims", claims, meta, CLAIM_COLUMNS, title="ToP-ViM, tiny preset: the paper's claims")
    write_results(out, "speed", speed, meta, SPEED_COLUMNS, title="ToP-ViM, tiny preset: wall-clock against dense")
    from prunelab.reproductions.top_vim.plots import curve_plot

    fig = curve_plot(curve, table, f"Vim test-bed, zero-shot ({len(y)} test images)")
    fig.savefig(out / "curve.png", dpi=120)
    plt.close(fig)  # written, not shown: a notebook displays the file
    for rows, columns in ((table, COLUMNS), (claims, CLAIM_COLUMNS), (speed, SPEED_COLUMNS)):
        print(markdown_table(rows, columns), end="\n\n")
    print(f"wrote {out / 'table.md'}, {out / 'curve.md'}, {out / 'claims.md'}, {out / 'speed.md'}, "
          f"{out / 'curve.png'} (+ JSON)")
    return {"table": table, "curve": curve, "claims": claims, "speed": speed, "provenance": meta}


def _claims(table: list[dict], tuned_diff: tuple[float, float]) -> list[dict]:
    """The paper's three claims, measured on the table's rows (``tuned_diff``: fine-tuned ToP-ViM minus fine-tuned
    naive pruning, paired, and its SE)."""
    get = {(r["model"], r["method"]): r for r in table}
    dense, naive = get[("base", "dense")]["top1"], get[("base", "naive removal (ToP scores)")]
    top, ft_naive, ft_top = get[("base", "ToP-ViM")], get[("ft_naive", "naive removal (ToP scores)")], \
        get[("ft_top", "ToP-ViM")]
    lost = dense - naive["top1"]
    recovered = (top["top1"] - naive["top1"]) / lost if lost > 0 else float("nan")
    diff, se = tuned_diff
    return [
        {"claim": "naive pruning collapses zero-shot", "measured": f"dense {dense:.2f} -> naive {naive['top1']:.2f} "
         f"({-lost:+.2f} points)", "holds": bool(lost > 10)},
        {"claim": "alignment recovers most of it (zero-shot)", "measured": f"ToP-ViM {top['top1']:.2f}: "
         f"{100 * recovered:.0f} % of the loss recovered", "holds": bool(recovered > 0.5)},
        {"claim": "ToP-ViM beats naive pruning after the same fine-tune", "measured": f"{ft_top['top1']:.2f} vs "
         f"{ft_naive['top1']:.2f} ({diff:+.2f} +- {se:.2f} points, paired)", "holds": bool(diff > 2 * se)},
    ]


def _speed(model, x: torch.Tensor, rounds: int) -> tuple[list[dict], list[str]]:
    """Dense against naive removal and the three aligned modes, interleaved. zero_slot and decay_only walk every
    slot, so only their FLOPs bound says what a kernel could give; gapped computes the kept tokens only."""
    configs = {"naive removal (ToP scores)": ToPViM(alignment="none"), "ToP-ViM": ToPViM(),
               "ToP-ViM decay_only": ToPViM(alignment="decay_only"), "ToP-ViM gapped": ToPViM(alignment="gapped")}
    dense_s, times = interleave(model, configs, lambda: model(x), rounds=rounds, warmup=1)
    rows, warnings = [], []
    for name, method in configs.items():
        speedup, iqr = ratio_summary(dense_s, times[name])
        bound = dense_macs(model) / top_vim_macs(model, method)
        if iqr > SPREAD_WARNING * speedup:
            warnings.append(f"{name}: speed-up {speedup:.2f}x with IQR {iqr:.2f} over {rounds} rounds")
        rows.append({"method": name, "alignment": method.alignment, "batch": len(x),
                     "dense_ms": 1e3 * statistics.median(dense_s), "ms": 1e3 * statistics.median(times[name]),
                     "speedup": speedup, "speedup_iqr": iqr, "bound": bound,
                     "of_bound": (speedup - 1) / (bound - 1) if bound > 1 else float("nan")})
    for w in warnings:
        print(f"WARNING: noisy timing: {w} (the machine was busy? rerun with more --rounds)")
    return rows, warnings


def default_out() -> Path:
    return Path("runs") / "top_vim" / "tiny"
