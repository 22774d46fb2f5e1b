"""A cached prompt prefix: its images' projector stages and its language-model layers up to the plan's first LLM
stage, computed once and reused by many prompts that continue it.

Causal attention makes every row of a prefix, up to any layer, independent of what follows it, and a projector stage
sees one image with its own rows. So for a fixed prefix (a demonstration set of an in-context prompt) the vision
tower, the projector stages of its images, and the language model's layers ``0 .. K0`` (``K0``: the plan's first LLM
stage) are the same for every query. :meth:`VLMHandle.cache_prefix <prunelab.common.vlm.VLMHandle.cache_prefix>`
runs them once and stops the forward after layer ``K0``; it keeps the cache of those layers, the rows' layer-``K0``
hidden states, positions and image bookkeeping. A query then runs as the continuation of that cache
(``PrefixCache.inputs``): the tower on its own images, the projector stages on its own images, layers ``0 .. K0`` on
its own rows (attending to the cached keys), and at layer ``K0`` the prefix rows join its rows, so that layer's
stages and every later layer see the whole prompt. That is the same computation as the whole prompt at once, up to
float rounding (the tests hold them to 1e-4), and generate() continues from it as from any prefill.

What a stage at ``K0`` may read: attention rows of the last token (``Needs.rows=("last",)``, also at ``K0 - 1``),
and the layer's keys and values. The prefix rows have keys in the cache but no queries in this forward, so
selectors of other query rows, look-ahead rows (``next_layer``) and reactivating stages are refused when the prefix
is cached.

Positions continue across the cut as in the whole prompt: LLaVA's are renumbered over the kept rows from the prefix's
next position; Qwen2.5-VL's M-RoPE ids are ``get_rope_index`` of the query's tokens shifted by the prefix's next id
(what the whole prompt's index gives them, whatever the model's stored ``rope_deltas``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from prunelab.common.hf import DynamicCache
from prunelab.common.vlm_llm_layer import PrefixReady
from prunelab.common.vlm_plan import ImageContext
from prunelab.common.vlm_prompt import Prompt

__all__ = ["PrefixCache", "build_prefix", "check_prefix_plan", "join_prefix"]

_MARK = "_prunelab_prefix"  # instance attribute of a cache handed out by PrefixCache.cache_for, until its prefill


@dataclass
class PrefixCache:
    """A prompt prefix run through the vision tower, the projector stages and LLM layers ``0 .. layer``.

    Attributes:
        owner: the engine state of the handle that cached it (a prefix serves only the plan that cut it).
        layer: ``K0``, the plan's first LLM stage layer; the cache holds layers ``0 .. K0``.
        keys, values: per cached layer ``[1, Hkv, P', d]``.
        hidden: ``[1, P', C]`` the prefix rows after layer ``K0``.
        input_ids: ``[1, P]`` the prefix's tokens; ``index`` ``[1, P']`` the token of each row (projector stages
            dropped the others); ``position_ids`` ``[1, P']`` the rows' positions (Qwen2.5-VL: ``[3, 1, P']``
            M-RoPE ids); ``next_pos`` the first position after them.
        images, kept, entry, history: the prefix images as the engine holds them after the projector stages (see
            ``VLMState``).
    """

    owner: Any
    layer: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    hidden: torch.Tensor
    input_ids: torch.Tensor
    index: torch.Tensor
    position_ids: torch.Tensor
    next_pos: int
    images: list[ImageContext]
    kept: list[torch.Tensor]
    entry: list[torch.Tensor]
    history: list[tuple[str, list[torch.Tensor]]]
    config: Any = None

    @property
    def rows(self) -> int:
        """P': the prefix rows in the cache."""
        return int(self.index.shape[1])

    @property
    def length(self) -> int:
        """P: the prefix's tokens."""
        return int(self.input_ids.shape[1])

    def cache_for(self, batch: int, image_grid_thw: torch.Tensor | None = None) -> DynamicCache:
        """A fresh cache holding the prefix for ``batch`` prompts (the prefix's own tensors are never written); it
        carries the query images' ``image_grid_thw`` (Qwen2.5-VL), which generate() keeps from the forward."""
        cache = DynamicCache(config=self.config)
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k.repeat(batch, 1, 1, 1), v.repeat(batch, 1, 1, 1), i)
        object.__setattr__(cache, _MARK, (self, image_grid_thw))
        return cache

    def inputs(self, **query) -> dict:
        """The forward / generate() arguments that continue the prefix with ``query`` (the processor's output for the
        text after the prefix and its images; ``attention_mask`` optional): its ``past_key_values`` and the mask over
        the prefix rows and the query's tokens. The query's ``input_ids`` come back unchanged."""
        ids = query.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError("input_ids: a prefix continues a [batch, length] tensor of token ids")
        if query.get("past_key_values") is not None:
            raise ValueError("past_key_values: the prefix supplies the cache")
        B, Q = ids.shape
        mask = query.get("attention_mask")
        mask = torch.ones(B, Q, dtype=torch.long, device=ids.device) if mask is None else mask
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask: shape {tuple(mask.shape)}, expected {tuple(ids.shape)}")
        full = torch.cat([torch.ones(B, self.rows, dtype=mask.dtype, device=mask.device), mask], dim=1)
        return {**query, "attention_mask": full, "past_key_values": self.cache_for(B, query.get("image_grid_thw"))}


def prefix_of(cache) -> tuple[PrefixCache | None, torch.Tensor | None]:
    """(the prefix, the query's image grids) a fresh cache from :meth:`PrefixCache.cache_for` carries; taken once,
    later calls see (None, None)."""
    mark = getattr(cache, _MARK, None) if cache is not None else None
    if mark is None:
        return None, None
    object.__delattr__(cache, _MARK)
    return mark


def check_prefix_plan(plan) -> int:
    """``K0``, the layer a prefix is cached through; a clear error for plans a prefix cannot serve."""
    ks = plan.llm_layers
    if not ks or ks[0] < 0:
        raise ValueError("plan: a prefix is cached through the plan's first LLM stage layer K >= 0; this plan has "
                         f"LLM stages after layers {list(ks)}")
    for s in plan.stages:
        if s.where != "llm":
            continue
        if s.reactivate:
            raise ValueError(f"plan: stage {s.name!r} brings tokens back, which a cached prefix does not support")
        if s.layer == ks[0] and (s.needs.next_layer or set(s.needs.rows) - {"last"}):
            raise ValueError(f"plan: stage {s.name!r} at layer {ks[0]} reads rows {s.needs.rows} (next_layer="
                             f"{s.needs.next_layer}); with a cached prefix only the last token's rows exist there")
    return ks[0]


def build_prefix(model, plan, state, inputs: dict) -> PrefixCache:
    """Run ``inputs`` (one prompt, no padding) up to the plan's first LLM stage layer and keep what a continuation
    needs (see the module docstring)."""
    K = check_prefix_plan(plan)
    ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError("input_ids: a prefix is one prompt, a [1, length] tensor")
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError("attention_mask: a prefix is one prompt without padding")
    if inputs.get("past_key_values") is not None:
        raise ValueError("past_key_values: a prefix starts from an empty cache")
    lm = model.model.language_model
    cache = DynamicCache(config=lm.config)
    state.building = K
    try:
        with torch.no_grad():
            model(**{k: v for k, v in inputs.items() if k != "use_cache"}, past_key_values=cache, use_cache=True)
    except PrefixReady as ready:
        hidden = ready.hidden
    else:
        raise RuntimeError(f"the forward ended without reaching LLM layer {K}")
    finally:
        state.building = None
    prompt: Prompt = state.prompt
    state.prompt = None  # the prefix's prompt never serves a decode step
    if not bool(prompt.valid.all()):
        raise RuntimeError("a prefix's rows are all valid (one prompt without padding)")
    layers = cache.layers[:K + 1]
    return PrefixCache(state, K, [c.keys for c in layers], [c.values for c in layers], hidden, state.input_ids,
                       prompt.index, prompt.position_ids, int(prompt.next_pos.amax()), list(state.images),
                       list(state.kept), list(state.entry), list(state.history), lm.config)


def query_positions(model, prefix: PrefixCache, input_ids: torch.Tensor, mask: torch.Tensor, grid_thw):
    """Qwen2.5-VL's M-RoPE ids ``[3, B, Q]`` of a continuation's tokens: the query's own index, after the prefix."""
    types = (input_ids == model.config.image_token_id).long()
    ids, _ = model.model.get_rope_index(input_ids, types, image_grid_thw=grid_thw, attention_mask=mask)
    return torch.where(mask.bool()[None], ids + prefix.next_pos, 0)


def join_prefix(prefix: PrefixCache, state, kwargs: dict, prompt: Prompt, lm) -> Prompt:
    """The prompt of a continuation: ``prompt`` (the query's rows after its projector stages, compacted) behind the
    prefix rows, in the engine's coordinates (prompt positions ``0 .. P-1`` the prefix, ``P ..`` the query). Sets the
    language model's positions and mask in ``kwargs`` and the state's images, kept ids, history and tokens."""
    valid_q = prompt.valid
    B, dev = valid_q.shape[0], valid_q.device
    P, Pr = prefix.length, prefix.rows
    if prompt.two_d:  # LLaVA: renumbered over the kept rows, from the prefix's next position
        pos_q = torch.where(valid_q, prefix.next_pos + valid_q.long().cumsum(-1) - 1, 0)
        next_pos = (prefix.next_pos + valid_q.sum(-1))[None]
        kwargs["position_ids"] = pos_q
    else:  # Qwen2.5-VL: the ids query_positions gave, kept over the rows
        pos_q, next_pos = kwargs["position_ids"], prompt.next_pos
    valid = torch.cat([torch.ones(B, Pr, dtype=torch.bool, device=dev), valid_q], dim=1)
    kwargs["attention_mask"] = valid.long()
    before = prefix.position_ids.to(dev)
    positions = torch.cat([before.expand(*before.shape[:-2], B, -1), pos_q], dim=-1)
    query_len = state.input_ids.shape[1]

    images, kept, entry, spans = [], [], [], []
    history = [(name, []) for name, _ in prefix.history]
    if [n for n, _ in state.history] != [n for n, _ in prefix.history]:
        raise RuntimeError("the prefix and the query ran different projector stages")
    own = {b: [i for i, img in enumerate(state.images) if img.span.sample == b] for b in range(B)}
    for b in range(B):
        members = [(prefix, j, 0) for j in range(len(prefix.images))] + [(state, i, P) for i in own[b]]
        for source, j, shift in members:
            img = source.images[j]
            span = dataclasses.replace(img.span, sample=b, image=len(spans), positions=img.span.positions + shift)
            spans.append(span)
            images.append(dataclasses.replace(img, span=span))
            kept.append(source.kept[j])
            entry.append(source.entry[j])
            for (_, ids), (_, got) in zip(history, source.history):
                ids.append(got[j])
    state.images, state.kept, state.entry, state.history = images, kept, entry, history
    state.input_ids = torch.cat([prefix.input_ids.to(dev).expand(B, -1), state.input_ids], dim=1)
    return Prompt(prompt.cache, P + query_len, valid, next_pos, prompt.two_d, spans,
                  torch.cat([prefix.index.to(dev).expand(B, -1), prompt.index + P], dim=1), position_ids=positions,
                  mask_len=Pr + query_len, rotary=lm.rotary_emb(kwargs["inputs_embeds"], positions),
                  prefix_hidden=prefix.hidden.expand(B, -1, -1))
