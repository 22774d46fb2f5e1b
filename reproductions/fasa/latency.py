"""Decode-step latency against dense, beside the bound from bytes moved.

A decode step of a small model is memory-bound: it reads every weight once and the part of the KV cache the
attention needs. So the speed-up a KV-selection method can reach over dense is at most
``bytes(dense step) / bytes(method step)``, with

- weights: every parameter once (tied embeddings counted once);
- dense cache: ``K`` and ``V`` of every layer, ``2 * Hkv * T * d`` elements;
- FASA, per selecting layer: the dominant-dim keys ``Hkv * T * |U_l|`` (``U_l`` the union of a key/value head's
  query heads' dims, see ``methods/fasa/method.py``) plus the selected rows of ``K`` and ``V`` as read:
  ``Hq * N * d`` each with one set per query head, ``Hkv * N * d`` each with shared sets;
- oracle top-k: the whole of ``K`` plus the selected rows.

We report the measured speed-up, the bound and their ratio (the fraction of the bound reached). Every method
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
from prunelab.methods.fasa import FASA, DenseDecode, KVSelection, OracleTopK


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def cache_bytes_read(model, method, T: int) -> int:
    """Bytes of KV cache one decode step reads at cache length ``T`` (see the module docstring)."""
    spec = decoder_spec(model)
    elem = next(model.parameters()).element_size()
    d, hkv, hq = spec.head_dim, spec.num_kv_heads, spec.num_heads
    dense_layer = 2 * hkv * T * d
    if not isinstance(method, KVSelection) or isinstance(method, DenseDecode):
        return spec.num_layers * dense_layer * elem
    n = min(method.budget if isinstance(method.budget, int) else int(method.budget * T), T)
    if n >= T:
        return spec.num_layers * dense_layer * elem
    sets = hq if method.gqa_mode == "per_q_head" else hkv
    widths = {}
    if isinstance(method, FASA):
        widths = {i: s.width for i, s in method.scorers(spec).items()}
    total = 0
    for layer in range(spec.num_layers):
        if layer in method.dense_layers:
            total += dense_layer
        else:
            score = hkv * T * (widths[layer] if isinstance(method, FASA) else d if isinstance(method, OracleTopK)
                               else 0)
            total += score + 2 * sets * n * d
    return total * elem


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
            if method is None:
                timings[name] = benchmark(step, warmup=warmup, repeat=repeat)
            else:
                with prunelab.apply(model, method):
                    timings[name] = benchmark(step, warmup=warmup, repeat=repeat)
            dense_bytes = weights + cache_bytes_read(model, DenseDecode(), T)
            method_bytes = weights + cache_bytes_read(model, method if method is not None else DenseDecode(), T)
            speedup = timings[name].speedup_over(timings["dense"]) if name != "dense" else 1.0
            bound = dense_bytes / method_bytes
            rows.append({"context": T, "method": name, "ms": 1e3 * timings[name].median_s,
                         "iqr_ms": 1e3 * timings[name].iqr_s, "gb_moved": method_bytes / 1e9, "speedup": speedup,
                         "bound": bound, "fraction_of_bound": speedup / bound})
    return rows
