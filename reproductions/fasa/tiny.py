"""``prunelab reproduce fasa --preset tiny``: FASA on a real pretrained model, offline on a CPU.

SmolLM2-135M-Instruct (packaged weights, see ``prunelab.common.packaged``) is calibrated on the first part of
CPython's ``pydoc_data`` topics and measured on a held-out part:

1. quality: perplexity, next-token agreement with dense and KL at budgets 64/128/256 tokens and 18.9 % of the
   context, for FASA (16 and 8 chunks; paper pairs and the official contiguous pairs), oracle top-k and
   sink + recent;
2. passkey retrieval at 1k-8k context for dense, FASA, oracle and sink + recent;
3. decode-step latency against dense at 2k/4k/8k context beside the bytes-moved bound.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from prunelab.cli import BUDGET, POSITIVE, UNIT
from prunelab.common.decoder import decoder_spec
from prunelab.common.hf import model_source
from prunelab.common.packaged import default_cache_dir, load_smollm2, pydoc_tokens
from prunelab.common.provenance import provenance, write_results
from prunelab.methods.baselines import OracleTopK
from prunelab.methods.fasa import FASA, Calibration, calibrate

from . import plots
from .full import sink_recent
from .latency import decode_latency
from .passkey import passkey_table
from .quality import decode_quality

CAL_KS = (64, 128, 256, 512)  # the tiny contexts are ~1k tokens: the paper's grid from 128 up, plus 64
CAL_WINDOWS, CAL_LEN, CAL_QUERIES = 4, 640, 64
BUDGETS = (64, 128, 256, 0.189)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--windows", type=POSITIVE, default=4, help="held-out windows for perplexity/agreement")
    parser.add_argument("--prefix", type=POSITIVE, default=1024, help="dense prefill tokens per window")
    parser.add_argument("--steps", type=POSITIVE, default=64, help="teacher-forced decode steps per window")
    parser.add_argument("--budgets", type=BUDGET, nargs="+", default=list(BUDGETS),
                        help="budgets: a token count (64) or a fraction of the context in (0, 1] (0.189)")
    parser.add_argument("--passkey-contexts", type=POSITIVE, nargs="*", default=[1024, 2048, 4096, 8000])
    parser.add_argument("--depths", type=UNIT, nargs="+", default=[0.2, 0.5, 0.8], help="passkey depths in [0, 1]")
    parser.add_argument("--passkey-budget", type=POSITIVE, default=256)
    parser.add_argument("--latency-contexts", type=POSITIVE, nargs="*", default=[2048, 4096, 8192])
    parser.add_argument("--layouts", nargs="+", default=["rope_pairs", "official_contiguous"],
                        choices=["rope_pairs", "official_contiguous"], help="chunk layouts to compare")
    parser.add_argument("--cache-dir", default=None, help="cache for the model and calibration files")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace, out: Path) -> dict:
    return run_tiny(out, windows=args.windows, prefix=args.prefix, steps=args.steps, budgets=list(args.budgets),
                    passkey_contexts=args.passkey_contexts, depths=args.depths, passkey_budget=args.passkey_budget,
                    latency_contexts=args.latency_contexts, layouts=tuple(args.layouts), cache_dir=args.cache_dir,
                    progress=not args.no_progress)


def default_out() -> Path:
    return Path("runs/fasa/tiny")


def smollm2_calibration(model, tokenizer, fc_layout: str = "rope_pairs", cache_dir=None,
                        progress: bool = True) -> Calibration:
    """SmolLM2's calibration on the pydoc calibration part, computed once and cached (about 40 s)."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir("fasa")
    path = cache / f"smollm2-135m-{fc_layout}-w{CAL_WINDOWS}x{CAL_LEN}-q{CAL_QUERIES}.json"
    if path.exists():
        try:
            cal = Calibration.load(path)
            cal.check(decoder_spec(model), fc_layout, model)
            return cal
        except ValueError as err:  # written by an older prunelab, or for other weights: compute it again
            print(f"FASA tiny: recomputing the cached calibration ({err})")
    ids = pydoc_tokens(tokenizer, "calibration")[: CAL_WINDOWS * CAL_LEN].view(CAL_WINDOWS, CAL_LEN)
    source = {"text": "pydoc_data.topics, calibration part (first 40 % of tokens)",
              "provenance": provenance(step="FASA calibration")}
    cal = calibrate(model, ids, ks=CAL_KS, n_queries=CAL_QUERIES, fc_layout=fc_layout, progress=progress,
                    source=source)
    cal.save(path)
    return cal


def _label(budget) -> str:
    return f"{100 * budget:.1f}%" if isinstance(budget, float) else str(budget)


def run_tiny(out, *, windows=4, prefix=1024, steps=64, budgets=BUDGETS, passkey_contexts=(1024, 2048, 4096, 8000),
             depths=(0.2, 0.5, 0.8), passkey_budget=256, latency_contexts=(2048, 4096, 8192),
             layouts=("rope_pairs", "official_contiguous"), cache_dir=None, progress=True) -> dict:
    """Run the three experiments and write tables (JSON + Markdown with provenance) and figures into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, tokenizer = load_smollm2(cache_dir=Path(cache_dir) / "models" if cache_dir else None)
    cals = {lay: smollm2_calibration(model, tokenizer, lay, cache_dir, progress) for lay in layouts}
    cal = cals[layouts[0]]
    name, revision = model_source(model)
    meta = provenance(preset="tiny", model=f"{name} ({revision}), float32",
                      calibration=f"{CAL_WINDOWS} windows x {CAL_LEN} tokens, last {CAL_QUERIES} positions as "
                                  "decode queries, K grid " + "/".join(map(str, CAL_KS)))
    results: dict = {}
    figs = {"agreement_map": plots.agreement_map(cal, 256),
            "chunk_frequency": plots.chunk_frequency(cal, 256, 16)}

    # 1. quality at each budget
    held = pydoc_tokens(tokenizer, "heldout")
    n = prefix + steps
    if windows * n > held.numel():
        raise ValueError(f"windows: {windows} windows of {n} tokens exceed the held-out part ({held.numel()})")
    wins = held[: windows * n].view(windows, n)
    methods = {}
    for b in budgets:
        for lay, c in cals.items():
            tag = "" if lay == "rope_pairs" else " (official contiguous)"
            methods[(f"FASA 16 FC{tag}", b)] = FASA(budget=b, calibration=c, fc_layout=lay)
        methods[("FASA 8 FC", b)] = FASA(budget=b, calibration=cal, n_fc=8)
        methods[("oracle top-k", b)] = OracleTopK(budget=b)
        methods[("sink+recent", b)] = sink_recent(b)
    q = decode_quality(model, wins, prefix, {k: m for k, m in methods.items()}, progress)
    quality = [{"method": "dense", "budget": "all", "budget_tokens": n, **q["dense"]}]
    for (name, b), stats in ((k, v) for k, v in q.items() if k != "dense"):
        tokens = b if isinstance(b, int) else int(b * (prefix + steps / 2))
        quality.append({"method": name, "budget": _label(b), "budget_tokens": tokens, **stats})
    write_results(out, "quality", quality, {**meta, "held_out": f"{windows} windows: {prefix} prefilled + "
                  f"{steps} teacher-forced decode steps"}, ["method", "budget", "ppl", "agreement", "kl", "steps"],
                  "FASA on SmolLM2-135M: decode-step quality against dense")
    results["quality"] = quality
    figs["budget_agreement"] = plots.budget_curves(quality, "agreement")
    figs["budget_ppl"] = plots.budget_curves(quality, "ppl")

    # 2. passkey
    if passkey_contexts:
        pk = {"FASA": FASA(budget=passkey_budget, calibration=cal), "oracle top-k": OracleTopK(budget=passkey_budget),
              "sink+recent": sink_recent(passkey_budget)}
        rows = passkey_table(model, tokenizer, passkey_contexts, depths, pk, progress=progress)
        write_results(out, "passkey", rows, {**meta, "budget": passkey_budget},
                      ["context", "depth", "key", "method", "answer", "correct"], "Passkey retrieval (greedy)")
        summary = [{"method": m, **{str(c): sum(r["correct"] for r in rows if r["method"] == m and
                                               r["context"] == c) for c in sorted({r["context"] for r in rows})}}
                   for m in ["dense", *pk]]
        write_results(out, "passkey_summary", summary, {**meta, "budget": passkey_budget, "cases_per_context":
                      len(depths)}, None, "Passkey: correct answers per context length")
        results["passkey"] = rows

    # 3. latency
    if latency_contexts:
        lat_methods = {"FASA 18.9%": FASA(budget=0.189, calibration=cal),
                       "FASA 18.9% shared_sum": FASA(budget=0.189, calibration=cal, gqa_mode="shared_sum"),
                       "FASA 18.9% 8 FC": FASA(budget=0.189, calibration=cal, n_fc=8),
                       "FASA 18.9% 8 FC shared_sum": FASA(budget=0.189, calibration=cal, n_fc=8,
                                                          gqa_mode="shared_sum"),
                       "oracle 18.9%": OracleTopK(budget=0.189)}
        ids = held[-max(latency_contexts):]
        rows = decode_latency(model, ids, latency_contexts, lat_methods, progress=progress)
        write_results(out, "latency", rows, {**meta, "threads": torch.get_num_threads()},
                      ["context", "method", "ms", "iqr_ms", "gb_moved", "speedup", "bound", "fraction_of_bound",
                       "bound_as_gathered"],
                      "Decode-step latency against dense and the bytes-moved bound")
        results["latency"] = rows
        figs["latency"] = plots.latency_bars([r for r in rows if "transformers" not in r["method"]])
    for name, fig in figs.items():
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=120)
    (out / "calibration.json").write_text(json.dumps({"file_of": cal.model, "ks": cal.ks, "source": cal.source}))
    print(f"FASA tiny: tables and figures in {out}")
    return results
