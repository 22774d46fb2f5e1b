"""CATP's reusable demonstration set on the in-context test-bed: the same answers as the whole prompts, and the time
a query saves.

For each of ``sets`` fixed demonstration sets of ``shots`` demonstrations (``icl.prompts``), ``queries`` query images
of the demonstrations' classes (``icl.with_queries``) are asked in batches of ``batch_size``, in three ways:

- dense: the whole prompts, unpruned;
- CATP: the whole prompts (demonstrations, then the query);
- CATP, reused: the demonstrations cached once per set (``DemonstrationSet``: the tower on their images, stage 1,
  language-model layers ``0 .. K``), each batch continuing them.

The three run interleaved batch by batch, ``repeats`` times (``main``: on one thread). Reported: milliseconds per
query (median and IQR over the batches and repeats), the per-batch ratio of reused to whole-prompt CATP (median,
IQR), the one-off caching time per set, the accuracy of each way, and the share of queries whose answer is the same
with and without reuse. The bound beside the ratio: the share of CATP's prefill MACs (tower, projector and language
model) that a query still computes when the demonstrations' part is cached.

``python -m prunelab.reproductions.catp.reuse`` (defaults below) writes ``reuse.{json,md}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

import prunelab
from prunelab.common.flops import ViTDims, vit_macs
from prunelab.common.llm_flops import LLMDims, layer_macs
from prunelab.common.provenance import provenance, write_results
from prunelab.common.timing import Timing, ratio_summary
from prunelab.methods.catp import CATP, context_total, query_count, stage1_count
from prunelab.methods.catp.demos import DemonstrationSet
from prunelab.reproductions.testbeds import icl

__all__ = ["COLUMNS", "main", "reuse_table"]

COLUMNS = ["way", "ms_per_query", "iqr_ms", "ratio_to_catp", "ratio_iqr", "accuracy", "same_answer", "n"]


def _split(x: dict, shots: int) -> tuple[dict, dict]:
    """(the first prompt's demonstrations, every prompt's query from its image on) of an ``icl.batch`` of prompts that
    share their demonstrations (no padding: equal shot counts)."""
    cut = shots * icl.DEMO
    per = shots + 1
    demos = {"input_ids": x["input_ids"][:1, :cut], "attention_mask": x["attention_mask"][:1, :cut],
             "pixel_values": x["pixel_values"][:shots]}
    queries = {"input_ids": x["input_ids"][:, cut:], "attention_mask": x["attention_mask"][:, cut:],
               "pixel_values": x["pixel_values"][shots::per]}
    return demos, queries


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _answers(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, icl.word_ids()].argmax(-1)


@torch.no_grad()
def reuse_table(out, *, shots: int = 8, sets: int = 4, queries: int = 32, batch_size: int = 16, ratio: float = 0.778,
                repeats: int = 2, seed: int = 0) -> list[dict]:
    """Measure the three ways (module docstring) and write ``reuse.{json,md}`` into ``out``; returns the rows."""
    model, _ = icl.load()
    dense_model = copy.deepcopy(model)  # never hooked: the dense way
    method = CATP.for_model(model, ratio=ratio, layer=1, query_layer=2)
    times = {"dense": [], "CATP": [], "CATP, reused": []}
    caching, hits = [], {k: 0 for k in times}
    same = total = 0
    with prunelab.apply(model, method) as handle:
        for s in range(sets):
            data = icl.with_queries(icl.prompts(shots, 1, seed=seed + s)[0], queries, seed=seed + s)
            batches = [icl.batch(data[i:i + batch_size]) for i in range(0, len(data), batch_size)]
            demos, _ = _split(batches[0], shots)
            if s == 0:  # one untimed call of each way first: allocator and thread-pool warm-up
                dense_model(**icl.model_inputs(batches[0]), logits_to_keep=1)
                model(**icl.model_inputs(batches[0]), logits_to_keep=1)
                model(**DemonstrationSet(handle, **demos).inputs(**_split(batches[0], shots)[1]), logits_to_keep=1)
            cached, t = _timed(lambda d=demos: DemonstrationSet(handle, **d))
            caching.append(t)
            for _ in range(repeats):
                for x in batches:
                    whole = icl.model_inputs(x)
                    reused = cached.inputs(**_split(x, shots)[1])
                    n = x["input_ids"].shape[0]
                    dense, t_d = _timed(lambda w=whole: dense_model(**w, logits_to_keep=1).logits)
                    catp, t_c = _timed(lambda w=whole: model(**w, logits_to_keep=1).logits)
                    again, t_r = _timed(lambda r=reused: model(**r, logits_to_keep=1).logits)
                    for way, t in zip(times, (t_d, t_c, t_r)):
                        times[way].append(1e3 * t / n)
                    for way, logits in zip(times, (dense, catp, again)):
                        hits[way] += int((_answers(logits) == x["answer"]).sum())
                    same += int((_answers(catp) == _answers(again)).sum())
                    total += n
    rows = []
    ratio, ratio_iqr = ratio_summary(times["CATP, reused"], times["CATP"])  # per batch: reused over whole-prompt CATP
    for way, ts in times.items():
        reused, t = way == "CATP, reused", Timing(tuple(ts))
        rows.append({"way": way, "ms_per_query": round(t.median_s, 2), "iqr_ms": round(t.iqr_s, 2),
                     "ratio_to_catp": round(ratio, 3) if reused else "",
                     "ratio_iqr": round(ratio_iqr, 3) if reused else "",
                     "accuracy": round(hits[way] / total, 4), "same_answer": round(same / total, 4) if reused else "",
                     "n": total})
    meta = provenance(preset="tiny", model=f"in-context test-bed ({icl.WEIGHTS.name}, sha256 "
                      f"{str(icl.SHA256)[:16]}...)", data=f"{sets} demonstration sets of {shots} shots (held-out "
                      f"images, seeds {seed}..{seed + sets - 1}), {queries} queries each, batches of {batch_size}, "
                      f"{repeats} repeats, interleaved",
                      settings=f"CATP R = {ratio}, K = 1, query layer 2; {torch.get_num_threads()} torch thread(s); "
                               f"caching per set {1e3 * statistics.median(caching):.1f} ms (median of {sets})",
                      bound=_bound(model, method, shots))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, "reuse", rows, meta, COLUMNS, "CATP on the in-context test-bed: a demonstration set cached once "
                  "and reused by every query, against the whole prompts")
    return rows


def _bound(model, method, shots: int) -> str:
    """The share of a prompt's prefill MACs a reused query still computes, from CATP's counts: the tower and projector
    on its one image (``flops.block_macs``) and the language model's rows (``llm_flops.layer_macs``; the layers after
    ``K`` are the same both ways). Stage 1's greedy is not a matrix product and is left out of both."""
    v, dims = model.config.vision_config, LLMDims.from_config(model.config)
    S, R, text = icl.vlm.TOKENS, method.ratio, 4 * shots + 2
    vit = ViTDims(depth=v.num_hidden_layers, embed_dim=v.hidden_size, attn_dim=v.hidden_size,
                  mlp_hidden=v.intermediate_size, num_patches=S, num_prefix=1, patch_in=3 * v.patch_size ** 2,
                  head_in=0, num_outputs=0)
    image = vit_macs(vit) + S * (v.hidden_size * dims.hidden + dims.hidden ** 2)  # tower, then the 2-layer projector
    first = text + (shots + 1) * stage1_count(S, R)  # rows of layers 0..K
    context = text + context_total([S] * shots, R)
    rows = [first] * (method.layer + 1) + [context + stage1_count(S, R)] * (method.query_layer - method.layer)
    rows += [context + query_count(S, R)] * (dims.layers - len(rows))
    whole = (shots + 1) * image + sum(layer_macs(dims, n) for n in rows)
    query = 2 + stage1_count(S, R)
    left = image + sum(layer_macs(dims, query, n) for n in rows[:method.layer + 1]) + sum(
        layer_macs(dims, n) for n in rows[method.layer + 1:])
    return (f"a reused query computes {left / whole:.3f} of the whole prompt's prefill MACs (tower, projector and "
            f"language model; {shots + 1} images, 1 of them encoded)")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="reproductions/catp", help="folder for reuse.{json,md}")
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--sets", type=int, default=4)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the least noise from the machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = reuse_table(args.out, shots=args.shots, sets=args.sets, queries=args.queries, batch_size=args.batch_size,
                       repeats=args.repeats, seed=args.seed)
    for r in rows:
        print(r)
    return rows


if __name__ == "__main__":
    main()
