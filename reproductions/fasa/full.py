"""``prunelab reproduce fasa --preset full``: a paper model on LongBench-V1, dense vs FASA and baselines.

The model loads through transformers' ``from_pretrained`` (a hub id with hub access, or a local folder), with
``accelerate``'s ``device_map="auto"``; LongBench-V1 is read from its released ``data/*.jsonl`` files. When no
calibration file is given, the model is calibrated first on ``qasper`` (8 samples, the official default) and the
file is written next to the results. Greedy decoding, middle truncation, one table of task scores per method
and budget, and the share of the dense (full-KV) score. ``expected.yaml`` holds the paper's claims.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

import prunelab
from prunelab.cli import BUDGET, POSITIVE, existing, model_arg
from prunelab.common.provenance import provenance, write_results
from prunelab.methods.baselines import DenseDecode, OracleTopK, SinkRecent
from prunelab.methods.fasa import DEFAULT_KS, FASA, Calibration, calibrate

from . import longbench

METHODS = ("dense", "fasa", "oracle", "sink_recent")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=model_arg, required=True,
                        help="hub id or local folder (e.g. meta-llama/Llama-3.1-8B-Instruct)")
    parser.add_argument("--revision", default=None, help="hub revision (commit) of the model")
    parser.add_argument("--tokenizer", type=model_arg, default=None,
                        help="tokenizer id or folder (default: the model's)")
    parser.add_argument("--longbench", type=existing("dir"), required=True, metavar="DIR",
                        help="LongBench-V1 data folder (*.jsonl)")
    parser.add_argument("--tasks", nargs="+", default=list(longbench.METRIC), help="LongBench tasks")
    parser.add_argument("--limit", type=POSITIVE, default=None, help="samples per task (default: all)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--budgets", type=BUDGET, nargs="+", default=[256],
                        help="a token count (256) or a fraction of the context in (0, 1] (0.189)")
    parser.add_argument("--n-fc", type=POSITIVE, default=16, help="FASA's dominant chunks per head (paper: 16)")
    parser.add_argument("--calibration", type=existing("file"), default=None,
                        help="FASA calibration file (default: calibrate on qasper)")
    parser.add_argument("--cal-samples", type=POSITIVE, default=8, help="qasper samples to calibrate on")
    parser.add_argument("--cal-ks", type=POSITIVE, nargs="+", default=list(DEFAULT_KS), help="calibration K grid")
    parser.add_argument("--prompts", type=existing("file"), default=None,
                        help="JSON task -> prompt template (LongBench's dataset2prompt)")
    parser.add_argument("--max-new-tokens", type=existing("file"), default=None,
                        help="JSON task -> max new tokens (dataset2maxlen)")
    parser.add_argument("--max-length", type=POSITIVE, default=31500, help="prompt tokens after middle truncation")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--no-progress", action="store_true")


def default_out() -> Path:
    return Path("runs/fasa/full")


def expected() -> dict:
    return yaml.safe_load((Path(__file__).with_name("expected.yaml")).read_text())


def _load(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model,
                                        revision=None if args.tokenizer else args.revision)
    model = AutoModelForCausalLM.from_pretrained(args.model, revision=args.revision,
                                                 dtype=getattr(torch, args.dtype),
                                                 device_map="auto" if torch.cuda.is_available() else None)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def _calibration(args, model, tok, out: Path, progress: bool) -> Calibration:
    if args.calibration:
        cal = Calibration.load(args.calibration)
        FASA(calibration=cal).check_model(model)  # the weights too: apply() itself sees only the config
        return cal
    need = max(args.cal_ks) + 64
    windows = []
    for s in longbench.load_task(args.longbench, "qasper", args.cal_samples):
        ids = tok(s["context"])["input_ids"]
        if len(ids) >= need:
            windows.append(torch.tensor(ids[:need]))
    if not windows:
        raise ValueError(f"cal_ks: no qasper sample has the {need} tokens that K={max(args.cal_ks)} needs; lower "
                         "--cal-ks or pass --calibration")
    cal = calibrate(model, torch.stack(windows), ks=tuple(args.cal_ks), n_queries=64, progress=progress,
                    source={"text": f"LongBench qasper, {len(windows)} samples, first {need} tokens"})
    cal.save(out / "calibration.json")
    return cal


def sink_recent(budget) -> SinkRecent:
    """The StreamingLLM baseline at ``budget``: 8 sinks, or ``budget - 1`` for a count of at most 8 tokens, so the
    recent window keeps the current token (``SinkRecent`` refuses a count <= n_sink)."""
    return SinkRecent(budget=budget, n_sink=min(8, budget - 1) if isinstance(budget, int) else 8)


def _method(name: str, budget, cal, n_fc: int):
    return {"dense": lambda: DenseDecode(), "fasa": lambda: FASA(budget=budget, calibration=cal, n_fc=n_fc),
            "oracle": lambda: OracleTopK(budget=budget), "sink_recent": lambda: sink_recent(budget)}[name]()


@torch.no_grad()
def _answer(model, tok, prompt: str, max_length: int, max_new: int) -> str:
    ids = longbench.truncate_middle(tok(prompt)["input_ids"], max_length)
    x = torch.tensor([ids], device=next(model.parameters()).device)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, x.shape[1]:], skip_special_tokens=True)


def run(args: argparse.Namespace, out: Path) -> dict:
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    model, tok = _load(args)
    prompts = json.loads(Path(args.prompts).read_text()) if args.prompts else {}
    max_new = json.loads(Path(args.max_new_tokens).read_text()) if args.max_new_tokens else {}
    cal = _calibration(args, model, tok, out, progress) if "fasa" in args.methods else None
    budgets = list(args.budgets)
    runs = [("dense", "all")] if "dense" in args.methods else []
    runs += [(m, b) for m in args.methods if m != "dense" for b in budgets]
    rows = []
    for task in args.tasks:
        samples = longbench.load_task(args.longbench, task, args.limit)
        template = prompts.get(task, longbench.GENERIC_PROMPT)
        for name, budget in runs:
            with prunelab.apply(model, _method(name, budget, cal, args.n_fc)):
                preds = [_answer(model, tok, longbench.build_prompt(s, template), args.max_length,
                                 int(max_new.get(task, 128)))
                         for s in tqdm(samples, desc=f"{task} {name} {budget}", disable=not progress)]
            rows.append({"task": task, "method": name, "budget": str(budget),
                         "score": longbench.score(task, preds, samples), "samples": len(samples)})
    dense = {r["task"]: r["score"] for r in rows if r["method"] == "dense"}
    for r in rows:
        r["pct_of_dense"] = 100 * r["score"] / dense[r["task"]] if dense.get(r["task"]) else float("nan")
    meta = provenance(preset="full", model=args.model, revision=args.revision or "", dtype=args.dtype,
                      prompts=args.prompts or "generic template (not the official per-task prompts)",
                      max_length=args.max_length)
    write_results(out, "longbench", rows, meta, ["task", "method", "budget", "score", "pct_of_dense", "samples"],
                  f"LongBench-V1: {args.model}")
    return {"rows": rows}
