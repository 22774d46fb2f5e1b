"""CATP on the in-context-learning test-bed (``reproductions/testbeds/icl.py``): accuracy against shots, dense and
pruned at the paper's ratios.

The test-bed's answer comes only from its demonstrations (labels drawn per prompt), so this is where CATP's claim can
be tested on a trained model: that it keeps the dense accuracy at R = 77.8 % while DivPrune drops. Every method
removes ``R`` of each prompt's image tokens by the last layer:

- CATP with ``R`` (stage 1 keeps ``1 - R/2`` per image; after layer ``K = 1`` the context keeps ``1 - R`` of its
  tokens jointly, after layer 2 the query image ``1 - R``; the test-bed's language model has 4 layers, so ``K = 6``
  does not exist and ``K = 1`` is the one that leaves a layer ``K - 1``);
- DivPrune and random tokens keeping ``1 - R`` of every image before layer 0;
- and, since CATP's image tokens averaged over the layers are more than ``1 - R`` (it prunes progressively),
  DivPrune and random at CATP's measured average share as well (``matched``), the comparison at equal compute.

``visual_%`` is the image tokens averaged over the language model's layers, as a share of the dense prompt's.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import prunelab
from prunelab.common.provenance import provenance, write_results
from prunelab.methods.baselines import RandomPrune
from prunelab.methods.catp import CATP, PAPER_RATIOS
from prunelab.methods.divprune import DivPrune
from prunelab.reproductions.testbeds import icl
from prunelab.reproductions.vlm_tiny import mean_visual

__all__ = ["COLUMNS", "SHOTS", "evaluate", "icl_table", "plot"]

SHOTS = (0, 2, 4, 8)
COLUMNS = ["shots", "method", "R", "visual_%", "accuracy", "se", "n"]
LABELS = {"catp": "CATP", "divprune": "DivPrune", "random_prune": "random"}


def _method(name: str, model, share: float):
    """``name`` keeping ``share`` of the image tokens (CATP: R = 1 - share)."""
    if name == "catp":
        return CATP.for_model(model, ratio=1.0 - share, layer=1, query_layer=2)
    return DivPrune(budget=share) if name == "divprune" else RandomPrune(budget=share)


@torch.no_grad()
def evaluate(model, data: Sequence, method=None, *, batch_size: int = 16) -> tuple[float, float]:
    """(accuracy, image tokens averaged over the language model's layers as a share of the dense count) of
    ``method`` (``None``: dense) on the prompts ``data``."""
    layers = model.config.get_text_config().num_hidden_layers
    hits, shares = 0, []
    for i in range(0, len(data), batch_size):
        x = icl.batch(data[i:i + batch_size])
        image = int((x["input_ids"] == model.config.image_token_id).sum())
        if method is None:
            logits = model(**icl.model_inputs(x), logits_to_keep=1).logits
            shares.append(1.0)
        else:
            with prunelab.apply(model, method) as h:
                logits = model(**icl.model_inputs(x), logits_to_keep=1).logits
                shares.append(mean_visual(h, layers) / image)
        hits += int((logits[:, -1, icl.word_ids()].argmax(-1) == x["answer"]).sum())
    return hits / len(data), statistics.fmean(shares)


def icl_table(out, *, shots: Sequence[int] = SHOTS, ratios: Sequence[float] = PAPER_RATIOS,
              methods: Sequence[str] = ("catp", "divprune", "random_prune"), n: int = 200, seed: int = 0,
              batch_size: int = 16) -> list[dict]:
    """Dense accuracy at every shot count, then each method at every ratio for the shot counts >= 1; writes
    ``icl.{json,md}`` and ``icl.png`` into ``out``."""
    model, _ = icl.load()
    rows = []
    for s in shots:
        data = icl.prompts(s, n, seed=seed)
        print(f"CATP tiny: in-context test-bed, {s} shots ({n} prompts) ...", flush=True)
        acc, _ = evaluate(model, data, batch_size=batch_size)
        rows.append(_row(s, "dense", 0.0, 1.0, acc, n))
        if s == 0:
            continue
        for R in ratios:
            catp_share = None
            for name in methods:
                acc, share = evaluate(model, data, _method(name, model, 1.0 - R), batch_size=batch_size)
                rows.append(_row(s, LABELS[name], R, share, acc, n))
                catp_share = share if name == "catp" else catp_share
            if catp_share is not None:  # the one-shot methods at CATP's average share: equal compute
                for name in (m for m in methods if m != "catp"):
                    acc, share = evaluate(model, data, _method(name, model, catp_share), batch_size=batch_size)
                    rows.append(_row(s, f"{LABELS[name]} (matched)", R, share, acc, n))
    uniform, copy = icl.chance(icl.prompts(max(shots), n, seed=seed))
    meta = provenance(preset="tiny", model=f"in-context test-bed ({icl.WEIGHTS.name}, sha256 "
                      f"{str(icl.SHA256)[:16]}...)", data=f"{n} held-out prompts per shot count (Fashion-MNIST test "
                      f"images, seed {seed})", chance=f"uniform over the {len(icl.WORDS)} words {uniform:.3f}; a "
                      f"context label at random ({max(shots)} shots) {copy:.3f}",
                      settings="CATP K = 1, query layer 2, lambda_1 0.7, lambda_2 0.6; DivPrune and random before "
                               "layer 0; se: binomial")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, "icl", rows, meta, COLUMNS, "CATP tiny: accuracy on the in-context test-bed (its answer "
                  "comes from the demonstrations) against shots, dense and at the paper's R")
    fig = plot(rows, out / "icl.png")
    plt.close(fig)
    return rows


def _row(shots: int, method: str, R: float, share: float, acc: float, n: int) -> dict:
    return {"shots": shots, "method": method, "R": R, "visual_%": 100 * share, "accuracy": acc,
            "se": (acc * (1 - acc) / n) ** 0.5, "n": n}


def plot(rows: Sequence[dict], path: str | Path | None = None):
    """Accuracy against R, one panel per shot count, dense dashed."""
    shots = sorted({r["shots"] for r in rows if r["method"] != "dense"})
    fig, axes = plt.subplots(1, max(1, len(shots)), figsize=(4 * max(1, len(shots)), 3.2), squeeze=False)
    for ax, s in zip(axes[0], shots):
        sub = [r for r in rows if r["shots"] == s]
        for method in dict.fromkeys(r["method"] for r in sub if r["method"] != "dense"):
            pts = sorted((r["R"], r["accuracy"]) for r in sub if r["method"] == method)
            ax.plot(*zip(*pts), marker="o", label=method, ls=":" if "matched" in method else "-")
        dense = next(r["accuracy"] for r in sub if r["method"] == "dense")
        ax.axhline(dense, color="k", ls="--", lw=1, label="dense")
        ax.set_xlabel("R, share of image tokens removed")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{s} shots", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
