"""Window-Diffusion's K/V cache and its partial forward, through transformers' own decoder layers.

Paper: Zuo et al., "Window-Diffusion: Accelerating Diffusion Language Model Inference with Windowed Token Pruning and
Caching", arXiv 2601.20332. Compared against vhicrgit/Window-Diffusion at d8bb349 (``llada/model/modeling_llada.py``:
``KVCacheManager``, ``block_forward_full``, ``block_forward_prune``); nothing was copied.

A refresh step runs the model over the sequence and records every layer's post-RoPE keys and values for all positions.
A pruned step runs embedding, every layer and the head on the active tokens A only: in each layer their keys and
values (RoPE at their absolute positions) overwrite the cache's rows A, and their queries attend, without a causal
mask, to the cache's rows W (the window: buffer rows stale since the refresh, plus A). The seam is the ``Cache`` object
transformers' attention layers already call (``past_key_values.update(k, v, layer_idx)``): :class:`WindowCache`
stores or scatters what it is given and returns the rows to attend to; the layers, RoPE, attention kernel (SDPA) and
head are the model's own.

Batches: A has the same size in every row (every row decodes the same number of tokens per step); W does not (the
prompts differ in length), so each row's window indices are padded with copies of a valid row and those keys are
masked out of the attention.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from prunelab.methods.window_diffusion.model import DiffusionLM, bidirectional_mask, padded_positions

__all__ = ["WindowCache", "refresh_forward", "partial_forward", "pad_indices"]


class WindowCache(DynamicCache):
    """Every layer's post-RoPE K/V for all positions, [B, kv_heads, N, head_dim] each.

    ``write`` [B, |A|] and ``read`` [B, |W|] (set by :func:`partial_forward`) turn ``update`` from recording a full
    forward's K/V into scattering the active rows (in place) and returning the window rows. The window rows are
    gathered once per window and kept: while the same ``read`` tensor comes back (the pruned steps of a phase), only
    the active rows are written into them, so a pruned step moves |A| rows of K/V per layer, not |W|.
    """

    def __init__(self, config, capacity: int | None = None) -> None:
        super().__init__(config=config)
        self.capacity = capacity  # rows kept per layer: a refresh of a shorter prefix is zero-padded to it
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.write: torch.Tensor | None = None
        self.read: torch.Tensor | None = None
        self._windows: dict[int, tuple] = {}  # layer -> (read, its keys, its values)
        self._slots: tuple | None = None  # (write, read, the write positions' slots in read or None)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.write is None:  # a refresh: record the whole forward's K/V
            extra = 0 if self.capacity is None else max(self.capacity - key_states.shape[2], 0)
            pad = (0, 0, 0, extra)
            self.keys[layer_idx] = torch.nn.functional.pad(key_states, pad) if extra else key_states
            self.values[layer_idx] = torch.nn.functional.pad(value_states, pad) if extra else value_states
            self._windows.pop(layer_idx, None)
            return key_states, value_states
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        b, h, _, d = keys.shape
        new_k, new_v = key_states.to(keys.dtype), value_states.to(keys.dtype)
        w = self.write[:, None, :, None].expand(b, h, -1, d)
        keys.scatter_(2, w, new_k)
        values.scatter_(2, w, new_v)
        kept = self._windows.get(layer_idx)
        slots = self._write_slots() if kept is not None and kept[0] is self.read else None
        if slots is None:  # a new window (or A not inside it): gather it from the cache
            r = self.read[:, None, :, None].expand(b, h, -1, d)
            kept = (self.read, keys.gather(2, r), values.gather(2, r))
            self._windows[layer_idx] = kept
        else:
            s = slots[:, None, :, None].expand(b, h, -1, d)
            kept[1].scatter_(2, s, new_k)
            kept[2].scatter_(2, s, new_v)
        return kept[1], kept[2]

    def _write_slots(self) -> torch.Tensor | None:
        """[B, |A|] the columns of ``read`` that hold the ``write`` positions (a padding copy of a position is never
        chosen), or None when a write position is not in ``read``; computed once per (write, read) pair."""
        if self._slots is None or self._slots[0] is not self.write or self._slots[1] is not self.read:
            n = max(int(self.read.max()), int(self.write.max())) + 1
            m = self.read.shape[1]
            columns = torch.arange(m, device=self.read.device).expand_as(self.read)
            first = torch.full((self.read.shape[0], n), m, dtype=torch.long, device=self.read.device)
            first.scatter_reduce_(1, self.read, columns, reduce="amin")  # the first column of each position
            slots = first.gather(1, self.write)
            self._slots = (self.write, self.read, None if bool((slots == m).any()) else slots)
        return self._slots[2]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if layer_idx not in self.keys else self.keys[layer_idx].shape[2]


def pad_indices(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged index lists -> ([B, M] indices padded with each row's first index, [B, M] validity)."""
    width = max(int(r.numel()) for r in rows)
    idx = torch.stack([torch.cat([r, r[:1].expand(width - r.numel())]) for r in rows])
    valid = torch.arange(width, device=idx.device)[None] < torch.tensor([r.numel() for r in rows],
                                                                           device=idx.device)[:, None]
    return idx, valid


def refresh_forward(model: DiffusionLM, ids: torch.Tensor, attention_mask: torch.Tensor,
                    cache: WindowCache) -> torch.Tensor:
    """A full forward over ``ids`` [B, N] that records every layer's K/V in ``cache``; -> logits [B, N, V]."""
    cache.write = cache.read = None
    logits = model.lm(input_ids=ids, attention_mask=bidirectional_mask(attention_mask),
                      position_ids=padded_positions(attention_mask), past_key_values=cache, use_cache=True).logits
    return logits


def partial_forward(model: DiffusionLM, ids: torch.Tensor, attention_mask: torch.Tensor, cache: WindowCache,
                    active: torch.Tensor, window: torch.Tensor, window_valid: torch.Tensor) -> torch.Tensor:
    """The active tokens' logits [B, |A|, V], attending to the window rows of the cache.

    Args:
        ids: [B, N] the current sequence (only the active columns are read).
        attention_mask: [B, N] 1 for real tokens (for the position ids).
        cache: a :class:`WindowCache` filled by :func:`refresh_forward` (and earlier partial forwards).
        active: [B, |A|] positions to compute (their cache rows are overwritten).
        window: [B, |W|] positions to attend to; ``window_valid`` [B, |W|] marks the padding copies.
    """
    cache.write, cache.read = active, window
    try:
        mask = window_valid[:, None, None, :].expand(-1, 1, active.shape[1], -1)
        positions = padded_positions(attention_mask).gather(1, active)
        return model.lm(input_ids=ids.gather(1, active), attention_mask=mask, position_ids=positions,
                        past_key_values=cache, use_cache=True).logits
    finally:
        cache.write = cache.read = None
