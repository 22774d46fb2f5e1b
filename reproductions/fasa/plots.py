"""Figures of the FASA reproduction: dominant chunks per head, budget curves, decode latency."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch


def agreement_map(calibration, k: int, ax=None):
    """Heat map of chunk agreement ``CA_K`` for every (layer, head) row and chunk column."""
    agreement = calibration.agreement[calibration.ks.index(k)]  # [L, Hq, J]
    L, H, J = agreement.shape
    ax = ax or plt.subplots(figsize=(7, 6))[1]
    im = ax.imshow(agreement.reshape(L * H, J), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(0, L * H, H), [str(i) for i in range(L)], fontsize=6)
    ax.set_xlabel("frequency chunk j (low j = high frequency)")
    ax.set_ylabel("layer (rows: its query heads)")
    ax.set_title(f"contextual agreement CA_{k} per head and chunk ({calibration.fc_layout})")
    plt.colorbar(im, ax=ax, fraction=0.04)
    return ax.figure


def chunk_frequency(calibration, k: int, n_fc: int, ax=None):
    """How often each chunk is among a head's ``n_fc`` dominant chunks (over all layers >= 1 and heads)."""
    from prunelab.methods.fasa import dominant_chunks

    chosen = dominant_chunks(calibration.agreement[calibration.ks.index(k)][1:], n_fc)
    share = chosen.float().mean(dim=(0, 1))
    ax = ax or plt.subplots(figsize=(7, 3))[1]
    ax.bar(torch.arange(share.numel()), share)
    ax.set_xlabel("frequency chunk j")
    ax.set_ylabel("share of heads")
    ax.set_title(f"how often a chunk is dominant (top {n_fc}, K={k})")
    return ax.figure


def budget_curves(rows, metric: str = "agreement", ax=None):
    """``metric`` against the budget, one line per method; rows carry ``method, budget_tokens, <metric>``."""
    ax = ax or plt.subplots(figsize=(6, 4))[1]
    dense = [r[metric] for r in rows if r["method"] == "dense"]
    for method in sorted({r["method"] for r in rows} - {"dense"}):
        pts = sorted((r["budget_tokens"], r[metric]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts), marker="o", label=method)
    if dense:
        ax.axhline(dense[0], color="k", ls="--", lw=1, label="dense")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget (tokens kept per step)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    return ax.figure


def latency_bars(rows, ax=None):
    """Decode-step time per method at each context, with the bytes-moved bound as a marker."""
    ax = ax or plt.subplots(figsize=(7, 4))[1]
    contexts = sorted({r["context"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ms = [next(r["ms"] for r in rows if r["context"] == c and r["method"] == m) for c in contexts]
        xs = [j + i * width for j in range(len(contexts))]
        ax.bar(xs, ms, width, label=m)
        dense = [next(r["ms"] for r in rows if r["context"] == c and r["method"] == "dense") for c in contexts]
        bound = [dm / next(r["bound"] for r in rows if r["context"] == c and r["method"] == m)
                 for dm, c in zip(dense, contexts)]
        ax.scatter(xs, bound, color="k", marker="_", s=200, zorder=3)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(contexts))], [str(c) for c in contexts])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode step (ms); black: bytes-moved bound")
    ax.legend(fontsize=7)
    return ax.figure
