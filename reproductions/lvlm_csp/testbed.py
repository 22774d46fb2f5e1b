"""LVLM_CSP on the tiny-LISA test-bed (``reproductions/testbeds/lisa.py``): gIoU and cIoU against the image tokens
per language-model layer.

The test-bed's mask is right only if its language model read the image (its SAM is frozen and class-agnostic, so
the ``[SEG]`` state must say where the garment is), so dropping the wrong image tokens costs IoU. Its language model
has 4 layers with 144 image tokens, so the paper's L1 = 8, L2 = 16 of 32 layers become L1 = 1 and L2 = 2 (the same
quarters) or 3. Rows:

- dense, and ``text only`` (one random image token before layer 0: what the model does without the image);
- LVLM_CSP at N_c in {16, 32} and N_keep in {8, 16, 32} (uniform representatives, ``add_rep_delta``), and at one
  setting each other selector that applies (``random``, ``cls``) and scatter mode;
- at each LVLM_CSP setting's measured average of image tokens per layer (equal image-token FLOPs, the paper's
  accounting): the one-stage baseline (``SegPrune``: all tokens in layer 0, the top tokens by the ``[SEG]`` row
  kept from layer 1 on) and random tokens before layer 0.

``visual_%``: the image tokens per layer averaged over the layers, as a share of 144, measured on the run; image-token
FLOPs in the paper's count are proportional to it.

:func:`speed_table` times the VLM's prefill (tower and language model) dense and under LVLM_CSP and the one-stage
baseline at equal FLOPs, interleaved, beside the language model's analytic MACs (``lm_macs_%``, the bound the
language model's share of the time could fall to; the tower's cost does not change).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from prunelab.common.llm_flops import LLMDims, prefill_macs
from prunelab.common.provenance import provenance, write_results
from prunelab.common.timing import interleave, ratio_summary
from prunelab.methods.baselines import RandomPrune
from prunelab.methods.lvlm_csp import LVLMCSP, SegPrune, mean_image_tokens
from prunelab.reproductions.testbeds import lisa, vlm

__all__ = ["COLUMNS", "SETTINGS", "SPEED_COLUMNS", "plot", "seg_table", "speed_table"]

COLUMNS = ["method", "setting", "visual_%", "giou", "giou_se", "ciou", "n"]
SETTINGS = tuple((c, k, l2) for l2 in (2, 3) for c in (16, 32) for k in (8, 16, 32))
"""(N_c, N_keep, L2) of the LVLM_CSP grid, L1 = 1."""
SHORT = ((16, 16, 2), (32, 8, 3))
VARIANTS = (("random", "add_rep_delta"), ("cls", "add_rep_delta"), ("uniform", "reembed"),
            ("uniform", "copy_rep_state"))
"""(selector, scatter_mode) run at the first setting beside the defaults (uniform, add_rep_delta)."""
LAYERS = 4
SPEED_COLUMNS = ["method", "setting", "lm_macs_%", "ms", "speedup", "speedup_iqr", "rounds"]


def _csp(model, clusters: int, keep: int, prune_layer: int, selector: str = "uniform",
         scatter_mode: str = "add_rep_delta", seed: int = 0) -> LVLMCSP:
    return LVLMCSP.for_model(model.vlm, clusters=clusters, keep=keep, scatter_layer=1, prune_layer=prune_layer,
                             selector=selector, scatter_mode=scatter_mode, seg_token_id=lisa.seg_token_id(), seed=seed)


def seg_table(out, *, n: int = 500, seed: int = 0, batch_size: int = 32, short: bool = False,
              rounds: int = 20) -> list[dict]:
    """The rows of this module's docstring on ``n`` held-out queries; writes ``seg.{json,md,png}`` into ``out``."""
    model, _ = lisa.load()
    q = lisa.queries("test", n, seed)
    N = vlm.TOKENS
    rows = []

    def add(method: str, setting: str, obj=None):
        print(f"LVLM_CSP tiny: {method} {setting} ({n} queries) ...", flush=True)
        s = lisa.evaluate(model, q, obj, batch_size=batch_size)
        rows.append({"method": method, "setting": setting, "visual_%": 100 * s.visual, "giou": s.giou,
                     "giou_se": s.giou_se, "ciou": s.ciou, "n": s.n})
        return s

    add("dense", "all 144 tokens in every layer")
    add("text only", "1 random image token", RandomPrune(budget=1, seed=seed))
    settings = SHORT if short else SETTINGS
    for i, (c, k, l2) in enumerate(settings):
        name = f"N_c {c}, N_keep {k}, L1 1, L2 {l2}"
        s = add("LVLM_CSP", name, _csp(model, c, k, l2, seed=seed))
        expected = mean_image_tokens(N, c, k, 1, l2, LAYERS) / N
        if abs(s.visual - expected) > 1e-9:
            raise RuntimeError(f"measured image tokens per layer {s.visual} differ from the FLOPs identity's "
                               f"{expected} at {name}")
        if i == 0 and not short:
            for selector, mode in VARIANTS:
                add(f"LVLM_CSP ({selector}, {mode})", name, _csp(model, c, k, l2, selector, mode, seed))
        mean = s.visual * N  # image tokens per layer: the budget of the one-stage baselines
        one_stage = round((LAYERS * mean - N) / (LAYERS - 1))  # all N in layer 0, then `one_stage` in 1..3
        if 1 <= one_stage <= N:
            add("[SEG] one-stage", f"keep {one_stage} from layer 1 (= {name})",
                SegPrune(keep=one_stage, layer=1, seg_token_id=lisa.seg_token_id()))
        add("random", f"{round(mean)} tokens before layer 0 (= {name})", RandomPrune(budget=round(mean), seed=seed))
    oracle = lisa.centroid_oracle(model, q)
    meta = provenance(preset="tiny", model=f"tiny-LISA test-bed ({lisa.WEIGHTS.name}, sha256 {lisa.SHA256[:16]}...)",
                      ceiling=f"the frozen SAM prompted at each target's centroid: gIoU {oracle[0]:.3f}, cIoU "
                              f"{oracle[1]:.3f} (what a [SEG] state that found the garment exactly would get)",
                      data=f"{n} held-out queries (composites of Fashion-MNIST test garments, seed {seed})",
                      settings="4-layer language model, 144 image tokens; LVLM_CSP L1 = 1, uniform representatives, "
                               "add_rep_delta unless named; [SEG] row at layer L2 - 1; one-stage and random "
                               "baselines at each LVLM_CSP setting's measured image tokens per layer")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, "seg", rows, meta, COLUMNS, "LVLM_CSP tiny: gIoU / cIoU of the tiny-LISA test-bed against "
                  "the image tokens per language-model layer")
    plt.close(plot(rows, out / "seg.png"))
    if rounds:
        speed_table(out, model, q.take(slice(0, batch_size)), rounds=rounds, seed=seed)
    return rows


def _lm_macs(model, x: dict, per_layer_image: list[int]) -> int:
    """Language-model prefill MACs of the batch ``x`` (unpadded, LM head on the last position) when every prompt's
    image has ``per_layer_image[l]`` tokens in layer ``l``."""
    dims = LLMDims.from_config(model.vlm.config.get_text_config())
    text = (x["attention_mask"].sum(-1) - vlm.TOKENS).tolist()
    return sum(prefill_macs(dims, [t + n for n in per_layer_image], logits=1) for t in text)


@torch.no_grad()
def speed_table(out, model, q, *, rounds: int = 20, seed: int = 0) -> list[dict]:
    """Prefill time of the VLM on the queries ``q`` (one batch) dense and under LVLM_CSP (N_c 16, N_keep 16, L1 1,
    L2 2) and the one-stage baseline at its image tokens per layer, interleaved over ``rounds``; writes
    ``speed.{json,md}``."""
    N, seg = vlm.TOKENS, lisa.seg_token_id()
    x = lisa.batch(q)
    x.pop("sam_pixel_values")
    configs = {"LVLM_CSP": _csp(model, 16, 16, 2, seed=seed), "[SEG] one-stage": SegPrune(keep=16, layer=1,
                                                                                           seg_token_id=seg)}
    counts = {"dense": [N] * LAYERS, "LVLM_CSP": [16, N, 16, 16], "[SEG] one-stage": [N, 16, 16, 16]}
    settings = {"dense": "all 144 tokens", "LVLM_CSP": "N_c 16, N_keep 16, L1 1, L2 2",
                "[SEG] one-stage": "keep 16 from layer 1 (equal image-token FLOPs)"}
    print(f"LVLM_CSP tiny: prefill speed, batch {len(q)}, {rounds} interleaved rounds ...", flush=True)
    dense, times = interleave(model.vlm, configs, lambda: model.vlm(**x, logits_to_keep=1), rounds=rounds)
    full = _lm_macs(model, x, counts["dense"])
    rows = [{"method": "dense", "setting": settings["dense"], "lm_macs_%": 100.0,
             "ms": 1e3 * sorted(dense)[len(dense) // 2], "speedup": 1.0, "speedup_iqr": 0.0, "rounds": rounds}]
    for key, t in times.items():
        median, iqr = ratio_summary(dense, t)
        rows.append({"method": key, "setting": settings[key], "lm_macs_%": 100 * _lm_macs(model, x, counts[key]) / full,
                     "ms": 1e3 * sorted(t)[len(t) // 2], "speedup": median, "speedup_iqr": iqr, "rounds": rounds})
    meta = provenance(preset="tiny", batch=len(q), threads=torch.get_num_threads(),
                      timing="wall clock of one VLM forward (tower, projector, language model; logits of the last "
                             "position), dense and each method interleaved per round; speedup: median and IQR of the "
                             "per-round ratios",
                      macs="language-model prefill MACs (projections, attention products over the full score "
                           "matrix, MLP, LM head on the last position), text tokens unpadded")
    write_results(out, "speed", rows, meta, SPEED_COLUMNS, "LVLM_CSP tiny: prefill time of the tiny-LISA VLM")
    return rows


def plot(rows: Sequence[dict], path: str | Path | None = None):
    """gIoU and cIoU against the image tokens per layer; dense and text-only as lines."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    styles = {"LVLM_CSP": "o", "[SEG] one-stage": "s", "random": "^"}
    for ax, metric in zip(axes, ("giou", "ciou")):
        for method, marker in styles.items():
            pts = sorted((r["visual_%"], r[metric]) for r in rows if r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker=marker, ls="", label=method)
        others = [r for r in rows if r["method"].startswith("LVLM_CSP (")]
        for r in others:
            ax.plot(r["visual_%"], r[metric], marker="x", ls="", color="gray")
        if others:
            ax.plot([], [], marker="x", ls="", color="gray", label="LVLM_CSP variants")
        for r, style in ((next(r for r in rows if r["method"] == "dense"), "--"),
                         (next(r for r in rows if r["method"] == "text only"), ":")):
            ax.axhline(r[metric], color="k", ls=style, lw=1, label=r["method"])
        ax.set_xlabel("image tokens per LLM layer, % of 144")
        ax.set_ylabel(metric.replace("iou", "IoU"))
        ax.legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
