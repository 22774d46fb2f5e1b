"""``prunelab calibrate fasa``: compute and save a model's FASA calibration file (stage A).

    prunelab calibrate fasa --model smollm2 --out smollm2.json            # packaged SmolLM2-135M, pydoc text
    prunelab calibrate fasa --model meta-llama/Llama-3.1-8B-Instruct --text qasper.txt --out llama.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from prunelab.cli import POSITIVE, existing, model_arg
from prunelab.common.packaged import load_smollm2, pydoc_tokens
from prunelab.common.provenance import provenance
from prunelab.methods.fasa import DEFAULT_KS, FC_LAYOUTS, calibrate


def _text(value: str) -> str:
    return value if value == "pydoc" else existing("file")(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=model_arg, required=True,
                        help="'smollm2' (packaged), a hub id or a local folder")
    parser.add_argument("--revision", default=None, help="hub revision of the model")
    parser.add_argument("--tokenizer", type=model_arg, default=None,
                        help="tokenizer id or folder (default: the model's)")
    parser.add_argument("--text", type=_text, default="pydoc",
                        help="'pydoc' (calibration part of pydoc_data) or a text file")
    parser.add_argument("--out", required=True, help="calibration file to write (JSON)")
    parser.add_argument("--windows", type=POSITIVE, default=4, help="calibration windows")
    parser.add_argument("--window-len", type=POSITIVE, default=None,
                        help="tokens per window (default max(ks) + queries)")
    parser.add_argument("--queries", type=POSITIVE, default=64, help="decode-step queries per window")
    parser.add_argument("--ks", type=POSITIVE, nargs="+", default=None,
                        help=f"budgets K (default {DEFAULT_KS}; 64..512 for the packaged SmolLM2 run)")
    parser.add_argument("--fc-layout", default="rope_pairs", choices=FC_LAYOUTS)
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])


def main(args: argparse.Namespace) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model == "smollm2":
        model, tok = load_smollm2()
        ks = tuple(args.ks or (64, 128, 256, 512))
    else:
        tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model,
                                            revision=None if args.tokenizer else args.revision)
        model = AutoModelForCausalLM.from_pretrained(args.model, revision=args.revision,
                                                     dtype=getattr(torch, args.dtype),
                                                     device_map="auto" if torch.cuda.is_available() else None).eval()
        ks = tuple(args.ks or DEFAULT_KS)
    length = args.window_len or max(ks) + args.queries
    if args.text == "pydoc":
        ids, what = pydoc_tokens(tok, "calibration"), "pydoc_data.topics, calibration part"
    else:
        ids, what = torch.tensor(tok(Path(args.text).read_text())["input_ids"]), args.text
    if ids.numel() < args.windows * length:
        raise ValueError(f"windows: {args.windows} windows of {length} tokens need more text than {what} has "
                         f"({ids.numel()} tokens)")
    windows = ids[: args.windows * length].view(args.windows, length)
    cal = calibrate(model.to(getattr(torch, args.dtype)), windows, ks=ks, n_queries=args.queries,
                    fc_layout=args.fc_layout, source={"text": what, "provenance": provenance(step="calibrate")})
    path = cal.save(args.out)
    print(f"FASA calibration of {cal.model} ({cal.revision}) written to {path}")
    return path
