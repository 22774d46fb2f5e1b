"""Prompt bookkeeping of the VLM engine: the pruned prompt of the cache in flight, for prefill and generate().

At prefill the kept rows are compacted to the right (left padding) and their positions rewritten; at every later
forward on the same cache the attention mask and positions are derived from this state (see ``prunelab.common.vlm``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from prunelab.common.hf import DynamicCache
from prunelab.common.vlm_layout import ImageSpan, adapter

__all__ = ["LayerRows", "Prompt", "compact", "compact_prompt", "decode_kwargs", "gather_seq", "positions_like",
           "record_image_sizes", "rows_by_position"]


@dataclass
class LayerRows:
    """Rows of the prompt held by the layers after LLM layer ``after``: ``index`` [B, L_k] into the post-projector
    rows (right-aligned, composed over the stages so far) and ``valid`` [B, L_k]; ``pos`` [B, L_k], the
    post-projector rows whose rotary embeddings (positions) these rows take after a renumbering stage (``None``:
    each row keeps its own, ``index``)."""

    after: int
    index: torch.Tensor
    valid: torch.Tensor
    pos: torch.Tensor | None = None

    @property
    def rotary(self) -> torch.Tensor:
        """The post-projector rows whose rotary embeddings these rows take."""
        return self.index if self.pos is None else self.pos


@dataclass
class Prompt:
    """The pruned prompt of the cache in flight (lives on the handle, never on a module)."""

    cache: Any
    orig_len: int  # L: prompt length as generate() counts it
    valid: torch.Tensor  # [B, L'] kept, non-padding slots of the compacted prompt
    next_pos: torch.Tensor  # [R, B] next position per sample (R rows of position_ids; R = 1 for 2-D ids)
    two_d: bool  # position_ids came as [B, L] (LLaVA) rather than [R, B, L] (Qwen2.5-VL)
    spans: list[ImageSpan]
    index: torch.Tensor  # [B, L'] prompt position of each compacted row (valid rows only)
    llm_rows: list[LayerRows] = field(default_factory=list)  # rows held after each LLM stage, in order
    embeds: torch.Tensor | None = None  # [B, L', C] the language model's input rows (kept for returning tokens)
    row_of: torch.Tensor | None = None  # [B, L] the compacted row of each prompt position (-1: dropped)
    position_ids: torch.Tensor | None = None  # [B, L'] (LLaVA) or [R, B, L'] the rows' positions
    # With a cached prefix (``vlm_prefix``): the 2-D mask's prompt columns as generate() counts them (prefix rows +
    # the query's tokens; ``orig_len`` otherwise), the rotary tables (cos, sin) of all rows, and the prefix's hidden
    # states after its last cached layer (until that layer's stages have read them).
    mask_len: int | None = None
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    prefix_hidden: torch.Tensor | None = None

    def keep_inputs(self, embeds: torch.Tensor) -> None:
        """Keep the language model's input rows, so tokens an LLM stage drops can come back later."""
        self.embeds = embeds
        self.row_of = rows_by_position(self.index, self.valid, self.orig_len)


def rows_by_position(where: torch.Tensor, valid: torch.Tensor, length: int) -> torch.Tensor:
    """[B, length]: the row holding each prompt position (-1: none), from ``where`` [B, L_k] (the prompt position
    of each row) and ``valid`` [B, L_k]."""
    out = torch.full((where.shape[0], length), -1, dtype=torch.long, device=where.device)
    b, k = valid.nonzero(as_tuple=True)
    out[b, where[b, k]] = k
    return out


def compact(keep_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows to gather [B, L'] (kept rows right-aligned, in order) and their validity, from ``keep_mask`` [B, L]."""
    counts = keep_mask.sum(-1)
    width = int(counts.max())
    order = torch.sort((~keep_mask).long(), dim=-1, stable=True).indices[:, :width]  # kept rows first, in order
    shift = (width - counts)[:, None]  # right-align: pad slots first
    slot = torch.arange(width, device=keep_mask.device)[None] - shift
    valid = slot >= 0
    index = torch.where(valid, order.gather(1, slot.clamp(min=0)), torch.zeros_like(order))
    return index, valid


def gather_seq(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` gathered along sequence ``dim`` with per-batch ``index`` [B, L'] (batch is the dim before)."""
    x = x.movedim(dim, -1).movedim(dim - 1, -2)  # [..., B, L]
    x = x.expand(*x.shape[:-2], index.shape[0], x.shape[-1])
    out = x.gather(-1, index.expand(*x.shape[:-2], *index.shape))
    return out.movedim(-2, dim - 1).movedim(-1, dim)


def positions_like(position_ids, inputs_embeds, family):
    """The language model's own default when ``position_ids`` is None: arange from an empty cache."""
    B, L = inputs_embeds.shape[:2]
    pos = torch.arange(L, device=inputs_embeds.device).expand(B, L)
    return pos.expand(3, B, L) if adapter(family).mrope else pos


def record_image_sizes(base, state, tiles_of: Callable) -> Callable[[], None]:
    """Wrap ``base.get_image_features`` (an instance attribute) to keep the ``image_sizes`` generate() drops, and
    set ``state.tiles = tiles_of(image_sizes)`` before the tower runs (its stages split tiles into images)."""
    name = "get_image_features"
    before = vars(base).get(name)  # normally absent: the class method is what runs
    original = getattr(base, name)

    @functools.wraps(original)
    def get_image_features(*args, **kwargs):
        sizes = kwargs["image_sizes"] if "image_sizes" in kwargs else args[1]
        state.tiles = tiles_of(sizes)
        out = original(*args, **kwargs)
        state.encoded = (out, sizes)
        return out

    object.__setattr__(base, name, get_image_features)

    def undo():
        if before is None:
            vars(base).pop(name, None)
        else:
            object.__setattr__(base, name, before)
        state.encoded = None

    return undo


def compact_prompt(kwargs: dict, keep_mask: torch.Tensor, valid: torch.Tensor, family: str, lm_config,
                   spans: list[ImageSpan]) -> tuple[dict, Prompt]:
    """The language model's prefill kwargs with only ``keep_mask`` [B, L]'s rows, right-aligned, and their
    positions: LLaVA's renumbered contiguously over the kept tokens, Qwen2.5-VL's M-RoPE ids kept."""
    embeds = kwargs["inputs_embeds"]
    B, L = embeds.shape[:2]
    index, new_valid = compact(keep_mask)
    pos = kwargs.get("position_ids")
    pos = positions_like(pos, embeds, family) if pos is None else pos
    two_d = pos.dim() == 2
    pos3 = pos[None] if two_d else pos
    new_pos = gather_seq(pos3, index, 2)
    # LLaVA (and Qwen's text row 0): renumber contiguously over the kept tokens, from the first one's id.
    # Qwen's M-RoPE rows keep their ids; decoding continues from the prompt's max id + 1 (rope_deltas' rule).
    renumber = 0 if (two_d or pos3.shape[0] == 4) else -1
    next_pos = torch.empty(pos3.shape[:2], dtype=pos3.dtype, device=pos3.device)
    for r in range(pos3.shape[0]):
        if r == renumber:
            first = torch.gather(new_pos[r], 1, new_valid.long().argmax(-1, keepdim=True))
            new_pos[r] = torch.where(new_valid, first + new_valid.long().cumsum(-1) - 1, 0)
            next_pos[r] = new_pos[r].masked_fill(~new_valid, -1).amax(-1) + 1
        else:
            next_pos[r] = pos3[r].expand(B, L).masked_fill(~valid, -1).amax(-1) + 1
    if renumber == -1 or pos3.shape[0] == 4:  # the three M-RoPE rows share one next id, as in get_rope_index
        next_pos[-3:] = next_pos[-3:].amax(0, keepdim=True)
    kwargs["inputs_embeds"] = gather_seq(embeds, index, 1)
    kwargs["position_ids"] = new_pos[0] if two_d else new_pos
    kwargs["attention_mask"] = new_valid.long()
    cache = kwargs.get("past_key_values")
    use_cache = kwargs.get("use_cache", getattr(lm_config, "use_cache", True))
    if cache is None and use_cache is not False:
        cache = DynamicCache(config=lm_config)
        kwargs["past_key_values"] = cache
    return kwargs, Prompt(cache, L, new_valid, next_pos, two_d, spans, index, position_ids=kwargs["position_ids"])


def decode_kwargs(kwargs: dict, prompt: Prompt) -> dict:
    """A decode step on the pruned cache: the mask over the kept prompt rows and the steps, positions from the
    prompt's next position plus the steps taken."""
    embeds = kwargs["inputs_embeds"]
    B, q = embeds.shape[:2]
    first = next((r.valid.shape[1] for r in prompt.llm_rows if r.after < 0), prompt.valid.shape[1])
    steps = prompt.cache.get_seq_length(0) - first  # layer 0 holds the prompt's rows, fewer after a layer -1 stage
    mask = kwargs.get("attention_mask")
    start = prompt.orig_len if prompt.mask_len is None else prompt.mask_len
    tail = (mask[:, start:].bool() if mask is not None and mask.dim() == 2
            else torch.ones(B, steps + q, dtype=torch.bool, device=embeds.device))
    if tail.shape[1] != steps + q:
        raise RuntimeError(f"attention_mask: {tail.shape[1]} columns after the prompt, expected {steps + q}")
    kwargs["attention_mask"] = torch.cat([prompt.valid, tail], dim=1).long()
    pos = prompt.next_pos[:, :, None] + steps + torch.arange(q, device=embeds.device)  # [R, B, q]
    kwargs["position_ids"] = pos[0] if prompt.two_d else pos
    return kwargs
