"""The VLM stage engine: visual-token pruning on unmodified transformers LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL.

The engine is written once; every family branch lives in the family's adapter (``vlm_family.py``, ``vlm_clip.py``,
``vlm_qwen.py``).

A method declares a :class:`~prunelab.common.vlm_plan.VLMPlan` (``vlm_plan()``; the first seam's ``vlm_select``
methods are converted). The engine runs its stages at these hook points:

(a) inside the vision encoder: per-head statistics at the layers the plan reads (``vlm_vision.py``), and the plan's
    vision stages after encoder layers l (a pre-hook of layer l + 1 drops patches; the family adapter scatters the
    tower's outputs back to full length so the projector and ``masked_scatter`` run unchanged, and the prompt's
    pruning starts from the tokens the tower kept);
(b) after the projector, before language-model layer 0: a forward pre-hook on ``model.model.language_model``
    sees the ``inputs_embeds`` into which ``LlavaModel`` / ``Qwen2_5_VLModel.forward`` has just
    ``masked_scatter``-ed the projected image features, so each span's rows are the projected visual embeddings;
    the plan's projector stages run there, each on what the previous one kept;
(c) after language-model layers K1 < K2 < ...: forward hooks at prefill, with attention rows of chosen queries
    computed beside SDPA (``vlm_llm_layer.py``).

Every stage returns one :class:`~prunelab.common.reduction.Reduction` per image, checked against the contract and
its exact budget; ``state.history`` keeps each stage's kept token ids per image.

generate() bookkeeping. transformers 5 tracks the prompt length only through the 2-D ``attention_mask`` and the
``position_ids`` it grows by one per step (``GenerationMixin._update_model_kwargs_for_generation``); decode steps
pass one new token (``next_sequence_length=1``), and the language model derives the mask from the cache length
(``create_causal_mask``). So the prune happens in the language model's pre-hook at prefill: the kept rows are
compacted to the right (left padding), the cache then holds ``L'`` rows instead of ``L``, and at every later
forward on that same cache object the pre-hook rewrites

- ``attention_mask`` to ``[kept mask of the prompt, the step columns generate appended]`` (length cache + q);
- ``position_ids`` from the prompt's next position plus the steps taken (cache length - ``L'``): LLaVA positions
  are renumbered contiguously over the kept tokens (an LLM stage with ``renumber`` renumbers the later layers'
  rows again and lowers the next position by the tokens it dropped); Qwen2.5-VL tokens keep their own 3-D M-RoPE
  ids and decode continues from ``max(id) + 1``, as ``get_rope_index``'s ``rope_deltas`` would. Deriving positions
  from the state, not from generate's counter, also makes right-padded prompts decode like unpadded ones.

LLaVA-NeXT under generate(): ``_prepare_multimodal_encoder_kwargs_for_generation`` runs
``model.model.get_image_features`` before the first forward and pops ``image_sizes`` from the forward's kwargs, yet
the tile grids (and so the per-tile vision statistics) are only defined by them. The seam wraps that method as an
instance attribute of ``model.model`` (generate finds it through ``base_model``; ``functools.wraps`` keeps the
signature it reads the argument names from) to record the sizes beside the output object they produced; the outer
pre-hook uses them when the forward receives that same object. The handle deletes the attribute again.

Layers after a stage (hook (c)) get their own mask and gathered rotary embeddings through pre-hooks, since their
cache is shorter than the earlier layers'.

A cached prefix (``VLMHandle.cache_prefix``, ``vlm_prefix.py``): one prompt run through the tower, the projector
stages and the layers up to the first LLM stage once; a forward whose ``past_key_values`` came from
``PrefixCache.inputs`` is a prefill of the query's rows on that cache, and the prefix rows join them at that layer.

Nothing is patched: hooks and instance attributes only, removed by the handle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from prunelab.common.decoder import require_eval
from prunelab.common.handle import Handle
from prunelab.common.vlm_family import Family, Tower
from prunelab.common.vlm_layout import ImageSpan, adapter, find_image_spans, require_family, vlm_family
from prunelab.common.vlm_llm_layer import install_llm_stages
from prunelab.common.vlm_methods import VLMRequest, plan_of
from prunelab.common.vlm_plan import ImageContext, Needs, Stage, VLMContext, VLMPlan
from prunelab.common.vlm_prefix import PrefixCache, build_prefix, join_prefix, prefix_of, query_positions
from prunelab.common.vlm_prompt import Prompt, compact_prompt, decode_kwargs, record_image_sizes
from prunelab.common.vlm_run import run_llm, run_projector, run_tower
from prunelab.common.vlm_vision import install_vision_hooks, per_image_stats

__all__ = ["ImageContext", "Needs", "Stage", "VLMContext", "VLMHandle", "VLMPlan", "VLMPruner", "VLMRequest",
           "install_vlm", "is_hf_vlm"]


@runtime_checkable
class VLMPruner(Protocol):
    """What a method implements: ``vlm_plan() -> VLMPlan``, whose stages return one
    :class:`~prunelab.common.reduction.Reduction` per image of their ``ctx`` (one row of ``K_i`` sorted, unique
    indices into the image's ``N_i`` tokens at that stage). The engine checks each against the contract and the
    stage's budget exactly.

    The first seam's protocol is still accepted: ``vlm_select(ctx)`` with optional ``vlm_request() -> VLMRequest``
    and ``vlm_budget(image, stage) -> int`` (see :func:`~prunelab.common.vlm_methods.plan_of`).
    """

    def vlm_plan(self) -> VLMPlan: ...


def is_hf_vlm(model: Any) -> bool:
    """True for transformers' LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, Qwen2_5_VL."""
    return vlm_family(model) is not None


@dataclass
class VLMState:
    """Per-forward bookkeeping. ``positions`` [B, L'] maps each output row to its prompt position (-1: pad)."""

    spans: list[ImageSpan] | None = None
    stats: dict = field(default_factory=dict)
    tiles: list[int] = field(default_factory=list)
    grid_thw: torch.Tensor | None = None
    prompt: Prompt | None = None
    positions: torch.Tensor | None = None
    kept: list[torch.Tensor] = field(default_factory=list)  # per image, kept token ids of its span
    entry: list[torch.Tensor] = field(default_factory=list)  # per image, the span's tokens that entered the LLM
    history: list[tuple[str, list[torch.Tensor]]] = field(default_factory=list)  # (stage, kept ids per image)
    encoded: tuple[Any, torch.Tensor] | None = None  # NeXT: (get_image_features output, its image_sizes)
    input_ids: torch.Tensor | None = None
    images: list[ImageContext] = field(default_factory=list)  # the last prefill's images with their statistics
    rows: dict = field(default_factory=dict)  # K / ("next" | "previous", K) -> (query, key, value, scaling, valid)
    tower: Tower | None = None  # what the vision-encoder stages of the last tower forward kept
    prefix: Any = None  # the cached prefix (``vlm_prefix.PrefixCache``) the forward in flight continues
    building: int | None = None  # while a prefix is cached: the layer its forward stops after


class VLMHandle(Handle):
    """A :class:`Handle` exposing the family, the plan and the last forward's :class:`VLMState`."""

    def __init__(self, model, method, undo, *, family: str, plan: VLMPlan, state: VLMState):
        super().__init__(model, method, undo)
        self.family, self.plan, self.state = family, plan, state

    @property
    def adapter(self) -> Family:
        """The family adapter (:class:`~prunelab.common.vlm_family.Family`) the engine runs on."""
        return adapter(self.family)

    def cache_prefix(self, **inputs) -> PrefixCache:
        """Run a prompt prefix (one prompt: a demonstration set) once through the tower, the projector stages and the
        language model up to the plan's first LLM stage; continue it with ``model(**prefix.inputs(**query))`` or
        ``model.generate(**prefix.inputs(**query))``. See ``prunelab.common.vlm_prefix``."""
        return build_prefix(self.model, self.plan, self.state, inputs)


def install_vlm(model, method) -> VLMHandle:
    """Install ``method`` (a :class:`VLMPruner`) into a supported transformers VLM; see ``prunelab.apply``."""
    family = require_family(model)
    fam = adapter(family)
    plan = plan_of(method)
    lm = model.model.language_model
    ks = plan.llm_layers
    if ks and not (-1 <= ks[0] and ks[-1] < len(lm.layers) - 1):
        raise ValueError(f"layer: LLM stages after layers {list(ks)}; must lie in [-1, {len(lm.layers) - 2}] "
                         "(a later layer must exist; -1: before layer 0)")
    if fam.mrope and any(s.renumber for s in plan.stages):
        raise ValueError(f"renumber: {family}'s M-RoPE position ids are kept, not renumbered, after an LLM stage")
    needs = plan.needs
    state = VLMState()
    undo = install_vision_hooks(model, family, needs.vision_layers, needs.received, needs.hidden, state.stats,
                                cls_row=needs.cls_row, vectors=needs.vectors)

    def outer_pre_hook(_module, args, kwargs):
        require_eval(model)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        prefix, grid = prefix_of(cache)
        state.prefix = prefix
        if prefix is None and cache is not None and cache.get_seq_length() > 0:
            return None  # a decode step on the pruned cache: the language-model hook handles it
        if input_ids is None:
            raise ValueError("input_ids: visual-token pruning needs input_ids to find the image spans")
        mask = kwargs.get("attention_mask")
        if prefix is not None:
            if prefix.owner is not state:
                raise ValueError("past_key_values: this prefix was cached by another handle; cache it with this one")
            if mask is None or mask.dim() != 2 or mask.shape[1] != prefix.rows + input_ids.shape[1]:
                raise ValueError("attention_mask: a continued prefix needs the mask of PrefixCache.inputs (the "
                                 "prefix rows, then the query's tokens)")
            mask = mask[:, prefix.rows:]
        state.input_ids = input_ids
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if kwargs.get("pixel_values") is None and encoded is None:
            raise ValueError("pixel_values: visual-token pruning needs images; got a text-only prompt")
        state.grid_thw, sizes = kwargs.get("image_grid_thw"), kwargs.get("image_sizes")
        if prefix is not None and state.grid_thw is None:
            state.grid_thw = grid  # generate() dropped them; its rope ids of a continuation do not give the grids
        if sizes is None and encoded is not None and state.encoded is not None and state.encoded[0] is encoded:
            sizes = state.encoded[1]  # generate() encoded these images and dropped image_sizes: the recorded ones
        state.encoded = None  # consumed: an output from an earlier call must never be matched to a later one
        state.spans = find_image_spans(model, family, input_ids, mask, sizes, state.grid_thw,
                                       None if encoded is None else encoded.pooler_output,
                                       None if prefix is not None else kwargs.get("position_ids"))
        if state.grid_thw is None:  # generate() path
            state.grid_thw = fam.grid_from_spans(model, state.spans)
        if fam.tiles_from_sizes and sizes is None and (any(state.stats.values()) or plan.layers("vision")):
            raise ValueError(f"image_sizes: vision statistics and stages on {family} need image_sizes in the "
                             "forward call")
        state.tiles = fam.crops(model, sizes, len(state.spans))
        if prefix is not None and fam.mrope:  # M-RoPE ids continuing the prefix's, whatever generate() derived
            return args, {**kwargs, "position_ids": query_positions(model, prefix, input_ids, mask, state.grid_thw)}
        return None

    def on_tower(_module, args, kwargs):
        for per_layer in state.stats.values():  # in place: the vision hooks hold these dicts
            per_layer.clear()
        state.tower = Tower()
        fam.on_tower_call(state, args, kwargs)

    def run_tower_stages(layer: int, images: list[ImageContext]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return run_tower(plan, family, state.tower.history, layer, images)

    undo.append(fam.tower(model).register_forward_pre_hook(on_tower, with_kwargs=True).remove)
    if plan.layers("vision"):
        reads = {layer: {v for s in plan.stages if s.where == "vision" and s.layer == layer
                         for v in s.needs.vision_layers} for layer in plan.layers("vision")}
        undo += fam.install_tower_stages(model, plan.layers("vision"), state, run_tower_stages, reads, plan.patches)
    undo.append(model.register_forward_pre_hook(outer_pre_hook, with_kwargs=True).remove)
    if fam.tiles_from_sizes:
        undo.append(record_image_sizes(model.model, state, lambda sizes: fam.crops(model, sizes, len(sizes))))

    def prefill(kwargs):

        spans, state.spans = state.spans, None
        state.encoded = None  # a forward with pixel_values recorded its own encoding after the outer pre-hook
        embeds = kwargs["inputs_embeds"]
        B, L = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        prefix, state.prefix = state.prefix, None
        if prefix is not None:  # the query's own rows; the prefix rows join at its last cached layer
            mask = mask[:, prefix.rows:]
            if not fam.mrope:  # LLaVA: renumbered from the prefix's next position when the prefix joins
                kwargs["position_ids"] = None
        valid = torch.ones(B, L, dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        tower, state.tower = state.tower, None  # consumed: a later prompt never reads this forward's tower
        has_stats = any(state.stats.values())
        stats = per_image_stats(model, family, state.stats, state.tiles, state.grid_thw, tower) if has_stats else None
        state.images = [ImageContext(s, embeds[s.sample, s.positions], torch.arange(s.num_tokens, device=embeds.device),
                                     **(stats[i] if stats else {})) for i, s in enumerate(spans)]
        state.history, state.rows = [], {}
        keeps = [img.token_ids for img in state.images]
        if plan.layers("vision"):
            if tower is None or not tower.history:
                raise RuntimeError("pixel_values: vision-encoder stages need the images encoded in this call")
            for name, ids in tower.history:
                if len(ids) != len(spans):
                    raise RuntimeError(f"the vision tower encoded {len(ids)} images, the prompt has {len(spans)}")
                keeps = [fam.span_ids(model, s, i).to(embeds.device) for s, i in zip(spans, ids)]
                state.history.append((name, keeps))
        kwargs["inputs_embeds"] = embeds = run_projector(plan, family, state, keeps, embeds, valid)
        keeps = state.entry = state.kept  # the tokens that enter the language model
        keep_mask = valid.clone()
        for s, keep in zip(spans, keeps):
            drop = torch.ones(s.num_tokens, dtype=torch.bool, device=embeds.device)
            drop[keep] = False
            keep_mask[s.sample, s.positions[drop]] = False
        left_aligned = bool((valid.long().diff(dim=-1) >= 0).all())  # right padding is compacted like a drop
        if bool((keep_mask == valid).all()) and not plan.llm_layers and left_aligned and prefix is None:
            state.prompt = None  # nothing dropped: the model runs exactly as it would without the method
            state.positions = torch.where(valid, torch.arange(L, device=valid.device), -1)
            return kwargs
        kwargs, state.prompt = compact_prompt(kwargs, keep_mask, valid, family, lm.config, spans)
        if prefix is not None:
            state.prompt = join_prefix(prefix, state, kwargs, state.prompt, lm)
        if any(s.reactivate for s in plan.stages):
            state.prompt.keep_inputs(kwargs["inputs_embeds"])
        state.positions = torch.where(state.prompt.valid, state.prompt.index, -1)
        return kwargs

    def lm_pre_hook(_module, args, kwargs):
        if kwargs.get("inputs_embeds") is None:
            return None
        if state.spans is not None:
            return args, prefill(kwargs)
        prompt = state.prompt
        if prompt is not None and kwargs.get("past_key_values") is prompt.cache and prompt.cache is not None:
            return args, decode_kwargs(kwargs, prompt)
        return None

    def run_stages(K: int, hidden: torch.Tensor, index, valid: torch.Tensor):
        """The plan's stages after LLM layer ``K``: rows to keep [B, L_k], (merged) hidden states, returning tokens."""
        recorded = {False: state.rows.pop(K, None), True: state.rows.pop(("next", K), None),
                    "previous": state.rows.pop(("previous", K), None)}
        return run_llm(plan, family, state, K, hidden, index, valid, recorded, model.config.image_token_id)

    undo.append(lm.register_forward_pre_hook(lm_pre_hook, with_kwargs=True).remove)
    undo += install_llm_stages(model, plan, state, run_stages)

    def remove():
        for fn in reversed(undo):
            fn()

    return VLMHandle(model, method, remove, family=family, plan=plan, state=state)

