"""FASA decode-step speed on CPU: SmolLM2-135M at 8k context, budget 18.9 %, against dense and the bytes bound.

    python benchmarks/fasa_speed.py [--contexts 8192] [--repeat 10]

Prints one row per method: median step time, speed-up over dense (same seam, same in-place cache), the bound
from bytes moved (weights + the part of the cache read) and the fraction of it reached. See
``reproductions/fasa/latency.py`` for the byte model.
"""

from __future__ import annotations

import argparse

import torch

from prunelab.common.packaged import load_smollm2, pydoc_tokens
from prunelab.common.provenance import markdown_table, provenance
from prunelab.methods.baselines import OracleTopK
from prunelab.methods.fasa import FASA
from prunelab.reproductions.fasa.latency import decode_latency
from prunelab.reproductions.fasa.tiny import smollm2_calibration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192])
    parser.add_argument("--budget", type=float, default=0.189)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tok = load_smollm2()
    cal = smollm2_calibration(model, tok)
    b = args.budget
    methods = {f"FASA {b:.1%}": FASA(budget=b, calibration=cal),
               f"FASA {b:.1%} shared_sum": FASA(budget=b, calibration=cal, gqa_mode="shared_sum"),
               f"FASA {b:.1%} 8 FC": FASA(budget=b, calibration=cal, n_fc=8),
               f"FASA {b:.1%} 8 FC shared_sum": FASA(budget=b, calibration=cal, n_fc=8, gqa_mode="shared_sum"),
               f"oracle {b:.1%}": OracleTopK(budget=b)}
    ids = pydoc_tokens(tok, "heldout")[-max(args.contexts):]
    rows = decode_latency(model, ids, args.contexts, methods, repeat=args.repeat)
    print(markdown_table(rows, ["context", "method", "ms", "iqr_ms", "gb_moved", "speedup", "bound",
                                "fraction_of_bound", "bound_as_gathered"]))
    meta = provenance()
    print(f"\ncommit {meta['commit']}, {meta['hardware']}, {meta['date_utc']}")


if __name__ == "__main__":
    main()
