"""Decode-step latency against dense, beside the bound from bytes moved.

A decode step of a small model is memory-bound: it reads every weight once and the part of the KV cache the
attention needs. So the speed-up a KV-selection method can reach over dense is at most
``bytes(dense step) / bytes(method step)``, with

- weights: every parameter once (tied embeddings counted once);
- dense cache: ``K`` and ``V`` of every layer, ``2 * Hkv * T * d`` elements;
- FASA, per selecting layer: the dominant-dim keys ``Hkv * T * |U_l|`` (``U_l`` the union of a key/value head's
  query heads' dims, see ``methods/fasa/method.py``) plus the selected rows of ``K`` and ``V``, each distinct row
  of a key/value head once (query heads of a group often pick the same rows; the count is recorded at the step);
- oracle top-k: the whole of ``K`` plus the selected rows.

We report the measured speed-up, the bound and their ratio (the fraction of the bound reached), and the bound
with rows counted as the torch path gathers them (once per query head), which is looser. Every method
runs through the same seam and the same in-place cache; transformers' stock dense path (its concatenating
``DynamicCache``) is timed too, for reference.
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache

import prunelab
from prunelab.common.decoder import decoder_spec
from prunelab.common.timing import benchmark
from prunelab.methods.baselines import DenseDecode, OracleTopK
from prunelab.methods.fasa import FASA


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def cache_bytes_read(model, method, T: int, rows: dict | None = None) -> tuple[int, int]:
    """Bytes of KV cache one decode step reads at cache length ``T``: ``(least, as gathered)``.

    ``rows`` is what the method's handler recorded for the step, ``{layer: (distinct rows, rows as gathered)}``;
    the first count is what any kernel must read (selected rows of a key/value head read once), the second what
    the torch path's per-query-head gather touches. Dense methods read every row.
    """
    spec = decoder_spec(model)
    elem = next(model.parameters()).element_size()
    d, hkv = spec.head_dim, spec.num_kv_heads
    dense_layer = 2 * hkv * T * d
    if not rows:
        return (spec.num_layers * dense_layer * elem,) * 2
    widths = {i: s.width for i, s in method.scorers(spec).items()} if isinstance(method, FASA) else {}
    least = gathered = 0
    for layer in range(spec.num_layers):
        if layer not in rows:  # a dense layer
            least += dense_layer
            gathered += dense_layer
            continue
        score = hkv * T * (widths[layer] if isinstance(method, FASA) else d if isinstance(method, OracleTopK) else 0)
        distinct, as_gathered = rows[layer]
        least += score + 2 * distinct * d
        gathered += score + 2 * as_gathered * d
    return least * elem, gathered * elem


def _to_dynamic(cache) -> DynamicCache:
    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys.clone(), layer.values.clone(), i)
    return out


@torch.no_grad()
def decode_latency(model, ids: torch.Tensor, contexts, methods: dict, repeat: int = 10, warmup: int = 3,
                   progress: bool = True) -> list[dict]:
    """Rows ``{context, method, ms, iqr_ms, speedup, bound, fraction_of_bound}`` per context and method.

    Args:
        ids: int64 ``[>= max(contexts)]`` token ids; one dense prefill of ``max(contexts) - 1`` tokens is cropped
            to each context.
        methods: name -> decoder method (``dense`` through the seam is added and is the reference).
    """
    from tqdm.auto import tqdm

    T_max = max(contexts)
    with prunelab.apply(model, DenseDecode()):
        full = model(ids[None, : T_max - 1], use_cache=True).past_key_values
    weights = weight_bytes(model)
    rows = []
    for T in tqdm(contexts, desc="decode latency", disable=not progress):
        base = copy.deepcopy(full)
        if T < T_max:
            base.crop(T - T_max)
        token = ids[T - 1 : T].view(1, 1)
        timings = {}
        for name, method in [("dense", DenseDecode()), ("dense (transformers DynamicCache)", None),
                             *methods.items()]:
            cache = _to_dynamic(base) if method is None else copy.deepcopy(base)
            step = lambda: model(token, past_key_values=cache, use_cache=True)  # noqa: B023
            record = {}
            if method is None:
                timings[name] = benchmark(step, warmup=warmup, repeat=repeat)
            else:
                with prunelab.apply(model, method) as handle:
                    timings[name] = benchmark(step, warmup=warmup, repeat=repeat)
                    if hasattr(handle.handler, "record"):  # one more, untimed step records the rows it reads
                        handle.handler.record = record
                        with torch.inference_mode():  # the cache now holds inference tensors
                            step()
            dense_bytes = weights + cache_bytes_read(model, DenseDecode(), T)[0]
            least, gathered = (weights + b for b in cache_bytes_read(model, method, T, record))
            speedup = timings[name].speedup_over(timings["dense"]) if name != "dense" else 1.0
            rows.append({"context": T, "method": name, "ms": 1e3 * timings[name].median_s,
                         "iqr_ms": 1e3 * timings[name].iqr_s, "gb_moved": least / 1e9, "speedup": speedup,
                         "bound": dense_bytes / least, "fraction_of_bound": speedup * least / dense_bytes,
                         "bound_as_gathered": dense_bytes / gathered})
    return rows
