"""The shared ``tiny`` preset of the VLM visual-token pruning papers (DivPrune, HiPrune, FlowCut, VisionDrop): offline,
CPU.

Tiny random LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL models are built from configs (``prunelab.common.tiny_vlm``,
fixed seeds) and fed one batch of several prompts with images (left padding, one or two images each). For each
method and keep ratio of the visual tokens (default 0.111 / 0.222 / 0.333, LLaVA-1.5's 64 / 128 / 192 of 576)
the preset measures, against the dense model:

- the visual tokens kept: after the last stage (``kept_visual``) and averaged over the language model's layers
  (``visual_mean``; they differ for methods that also prune inside the language model);

- prefill MACs and KV-cache bytes of the language model, dense and pruned (``vlm_prefill_cost``: unpadded
  sequences, LM head on the last position as ``generate()`` runs it, pruning before LLM layer 0);
- the same for ``random_prune`` at the paper's own method's measured mean share (``random (matched)``), where
  that share differs from the keep ratio;
- prefill latency of the whole VLM forward (vision tower, projector, selection, LLM; median of ``benchmark``);
- KL(dense || pruned) of the next-token distribution and top-1 agreement, on the last prompt position and on
  ``decode_steps`` further positions teacher-forced on the dense model's greedy continuation (so both models
  are compared on the same text, and a single disagreement does not change every later step).

The models are random, never trained: KL and agreement measure how close the pruned model stays to the dense
*random* model, not task accuracy; and the tiny models are so small that latency is dominated by per-call
overhead and the selection itself, not by the saved MACs. Both are stated in the table titles.

Because those models are random, the preset then measures what they cannot: each method's held-out accuracy at the
same keep ratios on the trained test-bed VLM (``testbed.{json,md}``, from ``vlm_bench.bench.write_testbed_table``;
``prunelab reproduce vlm_bench`` has every method, speed and the region probe).

The simple baseline is ``random_prune`` (:class:`prunelab.methods.baselines.RandomPrune`): uniformly random visual
tokens at the same budget, seeded per image of a prompt. Every method is built through ``prunelab.registry``.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import prunelab
from prunelab import registry
from prunelab.cli import NON_NEGATIVE, POSITIVE, RATIO
from prunelab.common.llm_flops import vlm_prefill_cost
from prunelab.common.provenance import provenance, write_results
from prunelab.common.timing import benchmark
from prunelab.common.tiny_vlm import FAMILIES, PAD, VOCAB, tiny_inputs, tiny_vlm
from prunelab.common.validate import check_int, check_ints, check_real
from prunelab.common.vlm_layout import find_image_spans

__all__ = ["KEEP_RATIOS", "METHODS", "PROMPTS", "make_method", "plot", "run_vlm_tiny", "tiny_preset"]

KEEP_RATIOS = (0.111, 0.222, 0.333)
"""64 / 128 / 192 of LLaVA-1.5's 576 tokens per image: the budgets both papers report."""

PROMPTS = (1, 2, 1, 1, 2, 1, 1, 1)
"""Images per prompt of the batch: several prompts, one with two images, so spans and lengths differ."""

METHODS = ("divprune", "hiprune", "flowcut", "visiondrop", "catp", "random_prune")
LABELS = {"dense": "dense", "divprune": "DivPrune", "hiprune": "HiPrune", "flowcut": "FlowCut",
          "visiondrop": "VisionDrop", "catp": "CATP", "random_prune": "random"}

MATCHED = "random (matched)"
"""Label of the random rows at the mean share of visual tokens per LLM layer that the paper's own method kept (its
``visual_mean``), added where that differs from the keep ratio by more than 2 % of the visual tokens (LLM stages,
per-tile counts, kept newlines, rounding on small images): random at the same budget in the sense that matters."""

COLUMNS = ["family", "method", "keep_ratio", "kept_visual", "visual_mean", "visual", "macs_M", "macs_%", "kv_kB",
           "ms", "speedup", "kl", "agreement", "kl_last", "agreement_last"]


def has_official_quirks(name: str) -> bool:
    """The registry's method ``name`` has an ``official_quirks`` switch."""
    return "official_quirks" in {f.name for f in dataclasses.fields(registry.get(name).cls)}


def make_method(name: str, model, family: str, ratio: float, seed: int = 0, official: bool = False):
    """The method ``name`` of :data:`METHODS` at keep ratio ``ratio`` for ``model``, from the registry with its
    settings for the tiny models (``MethodEntry.tiny``: HiPrune's shallow object block and kept NeXT newlines, so
    ratio 1.0 is exactly the dense model; the kept counts in the table include the newlines); ``official``: with
    ``official_quirks=True``."""
    if name not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {name!r}")
    entry = registry.get(name)
    settings = entry.tiny(model) if entry.tiny else {}
    if official:
        if not has_official_quirks(name):
            raise ValueError(f"official: {name} has no official_quirks switch")
        settings["official_quirks"] = True
    if name == "random_prune":
        settings["seed"] = seed
    if entry.tiny_budget is not None:
        return entry.build(model, **settings, **entry.tiny_budget(model, ratio))
    return entry.build(model, budget=ratio, **settings)


def _extend(x: dict, continuation: torch.Tensor) -> dict:
    """``x`` with ``continuation`` [B, T] text tokens appended (left padding keeps every row right-aligned)."""
    B, T = continuation.shape
    out = dict(x)
    out["input_ids"] = torch.cat([x["input_ids"], continuation], 1)
    out["attention_mask"] = torch.cat([x["attention_mask"], torch.ones(B, T, dtype=x["attention_mask"].dtype)], 1)
    if "mm_token_type_ids" in x:
        out["mm_token_type_ids"] = torch.cat([x["mm_token_type_ids"], torch.zeros(B, T, dtype=torch.long)], 1)
    return out


def _closeness(dense: torch.Tensor, pruned: torch.Tensor) -> dict:
    """KL(dense || pruned) in nats and top-1 agreement of [B, T, V] logits: over all T, and at T=0 only."""
    ld, lp = F.log_softmax(dense.double(), -1), F.log_softmax(pruned.double(), -1)
    kl = (ld.exp() * (ld - lp)).sum(-1)  # [B, T]
    agree = (dense.argmax(-1) == pruned.argmax(-1)).double()
    return {"kl": float(kl.mean()), "agreement": float(agree.mean()),
            "kl_last": float(kl[:, 0].mean()), "agreement_last": float(agree[:, 0].mean())}


@torch.no_grad()
def measure_family(family: str, methods: Sequence[str], ratios: Sequence[float], *, prompts=PROMPTS,
                   decode_steps: int = 8, warmup: int = 2, repeat: int = 10, seed: int = 0) -> list[dict]:
    """Rows of the table for one family: dense first, then each method at each keep ratio."""
    model = tiny_vlm(family, seed=seed)
    x = tiny_inputs(model, family, list(prompts), padding_side="left", seed=seed)
    L = x["input_ids"].shape[1]
    # The dense greedy continuation, teacher-forced below: positions L-1 .. L+T-1 predict the next token.
    # Ids >= 100 are image/vision markers or unused in the tiny vocab: a generated marker would be read as an
    # image placeholder in the teacher-forced prompt, so greedy decoding is kept to plain text ids.
    cont = model.generate(**x, max_new_tokens=decode_steps, do_sample=False, pad_token_id=PAD,
                          suppress_tokens=[PAD, *range(100, VOCAB)])[:, L:] if decode_steps else x["input_ids"][:, :0]
    xt = _extend(x, cont)
    n_pos = cont.shape[1] + 1
    dense_logits = model(**xt).logits[:, -n_pos:]
    spans = find_image_spans(model, family, x["input_ids"], x["attention_mask"], x.get("image_sizes"),
                             x.get("image_grid_thw"))
    visual = sum(s.num_tokens for s in spans)
    dense_cost = vlm_prefill_cost(model, x, [s.num_tokens for s in spans])
    dense_t = benchmark(lambda: model(**x), warmup=warmup, repeat=repeat, device="cpu")

    n_layers = model.config.get_text_config().num_hidden_layers

    def row(method, ratio, kept, cost, t, close, mean=None):
        return {"family": family, "method": method, "keep_ratio": ratio, "kept_visual": kept,
                "visual_mean": kept if mean is None else mean, "visual": visual,
                "macs_M": cost.pruned_macs / 1e6, "macs_%": 100 * cost.macs_ratio, "kv_kB": cost.pruned_kv_bytes / 1e3,
                "ms": t.median_s * 1e3, "ms_iqr": t.iqr_s * 1e3, "speedup": t.speedup_over(dense_t),
                "dense_macs_M": cost.dense_macs / 1e6, "dense_kv_kB": cost.dense_kv_bytes / 1e3,
                "tokens": list(cost.pruned_tokens), **close}

    def measure(method, label, ratio):
        with prunelab.apply(model, method) as h:
            close = _closeness(dense_logits, model(**xt).logits[:, -n_pos:])
            t = benchmark(lambda: model(**x), warmup=warmup, repeat=repeat, device="cpu")
            cost = vlm_prefill_cost(model, x, h)  # the handle's state is the last forward's: the prompt x
            kept = sum(int(k.numel()) for k in h.state.kept)
            mean = mean_visual(h, n_layers)
        return row(label, ratio, kept, cost, t, close, mean)

    rows = [row("dense", 1.0, visual, dense_cost, dense_t, _closeness(dense_logits, dense_logits))]
    for name in methods:
        for ratio in ratios:
            rows.append(measure(make_method(name, model, family, ratio, seed), LABELS[name], ratio))
    own = [r for r in rows if methods and r["method"] == LABELS[methods[0]] and r["keep_ratio"] < 1]
    if "random_prune" in methods[1:]:  # random at the mean share the paper's method actually kept, where it differs
        for r in own:
            plain = next(p for p in rows if p["method"] == "random" and p["keep_ratio"] == r["keep_ratio"])
            if abs(r["visual_mean"] - plain["visual_mean"]) > 0.02 * visual:
                method = make_method("random_prune", model, family, r["visual_mean"] / visual, seed)
                rows.append(measure(method, MATCHED, r["keep_ratio"]))
    return rows


def mean_visual(handle, n_layers: int) -> float:
    """Visual tokens of the batch averaged over the language model's layers, after the last forward of ``handle``
    (the tokens entering layer 0, then what each LLM stage kept for the layers after it)."""
    state, llm = handle.state, [s for s in handle.plan.stages if s.where == "llm"]
    counts = [sum(int(k.numel()) for k in (state.entry if llm else state.kept))] * n_layers
    for stage, (_, ids) in zip(llm, state.history[-len(llm):] if llm else []):
        counts[stage.layer + 1:] = [sum(int(k.numel()) for k in ids)] * (n_layers - stage.layer - 1)
    return statistics.fmean(counts)


def plot(rows: Sequence[dict], path: str | Path | None = None):
    """KL and top-1 agreement against the kept share of visual tokens, one column per family."""
    families = list(dict.fromkeys(r["family"] for r in rows))
    fig, axes = plt.subplots(2, len(families), figsize=(4 * len(families), 6), squeeze=False)
    for j, fam in enumerate(families):
        sub = [r for r in rows if r["family"] == fam]
        for i, metric in enumerate(("kl", "agreement")):
            ax = axes[i][j]
            for method in dict.fromkeys(r["method"] for r in sub if r["method"] != "dense"):
                pts = sorted((r["visual_mean"] / r["visual"], r[metric]) for r in sub if r["method"] == method)
                ax.plot(*zip(*pts), marker="o", label=method)
            ax.axhline(next(r[metric] for r in sub if r["method"] == "dense"), color="k", ls="--", lw=1,
                       label="dense")
            ax.set_xlabel("kept share of visual tokens (mean over LLM layers)")
            ax.set_ylabel("KL(dense || pruned), nats" if metric == "kl" else "top-1 agreement with dense")
            ax.set_title(fam, fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("tiny random VLMs: closeness to the dense model (not task accuracy)", fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def summary(rows: Sequence[dict]) -> list[dict]:
    """Per method and keep ratio: the mean over families of the visual share kept (mean over LLM layers), the MACs
    share, speedup, KL and agreement."""
    keys = list(dict.fromkeys((r["method"], r["keep_ratio"]) for r in rows))
    out = []
    for method, ratio in keys:
        sub = [r for r in rows if r["method"] == method and r["keep_ratio"] == ratio]
        out.append({"method": method, "keep_ratio": ratio, "families": len(sub),
                    "visual_%": statistics.fmean(100 * r["visual_mean"] / r["visual"] for r in sub),
                    **{k: statistics.fmean(r[k] for r in sub) for k in ("macs_%", "speedup", "kl", "agreement")}})
    return out


def run_vlm_tiny(out, methods: Sequence[str] = METHODS, *, paper: str, families: Sequence[str] = FAMILIES,
                 ratios: Sequence[float] = KEEP_RATIOS, prompts: Sequence[int] = PROMPTS, decode_steps: int = 8,
                 warmup: int = 2, repeat: int = 10, seed: int = 0, testbed_n: int = 400) -> dict:
    """Run every family, write ``tiny.{json,md}``, ``tiny_summary.{json,md}`` and ``tiny.png`` into ``out``; then
    the methods' held-out accuracy on the trained test-bed VLM, ``testbed.{json,md}`` (``testbed_n`` questions; 0
    skips it).

    Args:
        methods: names from :data:`METHODS`; the paper's own method should come first (it is listed first).
        paper: the reproduction's name, for the titles.
        ratios: keep ratios of the visual tokens per image, each in (0, 1].
        prompts: images per prompt of the batch.
        decode_steps: teacher-forced positions after the prompt's last one (0: the last position only).
    """
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"methods: unknown {bad}; choose from {METHODS}")
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise ValueError(f"families: unknown {bad}; choose from {FAMILIES}")
    ratios = [check_real(r, f"ratios[{i}]", low=0.0, high=1.0, low_open=True) for i, r in enumerate(ratios)]
    prompts = check_ints(prompts, "prompts", low=1)  # images per prompt: at least one each
    if not ratios or not prompts:
        raise ValueError(f"{'ratios' if not ratios else 'prompts'}: expected at least one value")
    decode_steps = check_int(decode_steps, "decode_steps", low=0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for fam in families:
        print(f"{paper} tiny: {fam} ...", flush=True)
        rows += measure_family(fam, methods, [float(r) for r in ratios], prompts=prompts, decode_steps=decode_steps,
                               warmup=warmup, repeat=repeat, seed=seed)
    meta = provenance(preset="tiny", paper=paper, models="tiny random LLaVA-1.5 / LLaVA-NeXT / Qwen2.5-VL from "
                      f"configs (prunelab.common.tiny_vlm, seed {seed}), float32, SDPA",
                      batch=f"{len(prompts)} prompts with {list(prompts)} images, left padding",
                      quality=f"KL(dense || pruned) and top-1 agreement over the last prompt position and "
                              f"{decode_steps} positions teacher-forced on the dense greedy continuation; "
                              "*_last: the last prompt position only",
                      macs="language-model prefill MACs of the batch, unpadded, LM head on the last position "
                           "(prunelab.common.llm_flops); kv_kB: KV cache after prefill",
                      latency=f"whole VLM forward of the padded batch, median of {repeat} after {warmup} warm-up "
                              f"(speedup over dense; torch threads {torch.get_num_threads()})")
    own = LABELS[methods[0]] if methods else ""
    title = (f"{paper} tiny: {own} against {', '.join(LABELS[m] for m in methods[1:])} and dense on tiny random "
             "VLMs; KL and agreement measure closeness to the dense random model, not task accuracy")
    write_results(out, "tiny", rows, meta, COLUMNS, title)
    summ = summary(rows)
    write_results(out, "tiny_summary", summ, meta, None, f"{paper} tiny: means over the families (random models: "
                  "closeness to dense, not accuracy)")
    fig = plot(rows, out / "tiny.png")
    plt.close(fig)
    result = {"rows": rows, "summary": summ}
    if testbed_n:
        from prunelab.reproductions.vlm_bench.bench import write_testbed_table

        result["testbed"] = write_testbed_table(out, methods, ratios, paper=paper, n=testbed_n, seed=seed)
    print(f"{paper} tiny: tables and figure in {out}")
    return result


def add_tiny_arguments(parser) -> None:
    """The tiny preset's options, shared by the DivPrune and HiPrune reproductions."""
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                        help="methods to compare (default: the paper's own first, then the others)")
    parser.add_argument("--ratios", type=RATIO, nargs="+", default=list(KEEP_RATIOS),
                        help="keep ratios of each image's visual tokens, in (0, 1]")
    parser.add_argument("--prompts", type=POSITIVE, nargs="+", default=list(PROMPTS), help="images per prompt")
    parser.add_argument("--decode-steps", type=NON_NEGATIVE, default=8,
                        help="teacher-forced positions after the prompt")
    parser.add_argument("--warmup", type=NON_NEGATIVE, default=2, help="untimed forwards before timing")
    parser.add_argument("--repeat", type=POSITIVE, default=10, help="timed forwards (median reported)")
    parser.add_argument("--seed", type=NON_NEGATIVE, default=0, help="model, input and random-baseline seed")
    parser.add_argument("--testbed-n", type=NON_NEGATIVE, default=400,
                        help="held-out questions for the accuracy table on the trained test-bed VLM (0: skip it)")


def tiny_preset(name: str, paper: str, methods: Sequence[str]):
    """``(add_arguments, run, default_out)`` of a paper's tiny preset module: the shared comparison, with the
    paper's own method listed first and its own output folder."""

    def run(args, out: Path) -> dict:
        return run_vlm_tiny(out, args.methods or methods, paper=paper, families=args.families, ratios=args.ratios,
                            prompts=args.prompts, decode_steps=args.decode_steps, warmup=args.warmup,
                            repeat=args.repeat, seed=args.seed, testbed_n=args.testbed_n)

    return add_tiny_arguments, run, lambda: Path(f"runs/{name}/tiny")
