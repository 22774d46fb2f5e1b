"""A transformers KV cache that appends in place and keeps per-method views of the keys.

transformers' default ``DynamicLayer`` grows by ``torch.cat``, which reads and rewrites the whole cache at every
decode step. That triples the cache traffic of a decode step and would hide exactly what a KV-selection method
saves (it reads a fraction of the cache). :class:`GrowingLayer` keeps preallocated buffers that double when full,
so a decode step writes one row and attention reads views ``buffer[:, :, :T]``.

Methods that need another layout of the keys (FASA scores tokens with a few "dominant" dims, so it keeps them in a
contiguous side buffer) ask for a *derived* buffer: ``layer.derived(key, fn, width)`` applies ``fn`` to the keys
not yet derived and appends the rows, so the buffer stays in step with the cache whatever filled it (a dense
prefill, another method, a copied cache).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from prunelab.common.hf import DynamicCache, DynamicLayer

__all__ = ["GrowingLayer", "PrunelabCache"]

_MIN_GROWTH = 256  # rows added at least on each reallocation: few reallocations during a generate() call


class _Rows:
    """A ``[B, H, capacity, w]`` buffer with ``length`` rows in use; appends in place and doubles when full."""

    def __init__(self, first: torch.Tensor):
        self.buffer = first.new_empty(*first.shape[:2], first.shape[2] + _MIN_GROWTH, first.shape[3])
        self.length = 0
        self.append(first)

    def append(self, rows: torch.Tensor) -> None:
        need = self.length + rows.shape[2]
        if need > self.buffer.shape[2]:
            grown = self.buffer.new_empty(*self.buffer.shape[:2], max(need + _MIN_GROWTH, 2 * self.buffer.shape[2]),
                                          self.buffer.shape[3])
            grown[:, :, : self.length] = self.buffer[:, :, : self.length]
            self.buffer = grown
        self.buffer[:, :, self.length : need] = rows
        self.length = need

    def view(self) -> torch.Tensor:
        return self.buffer[:, :, : self.length]

    def select_batch(self, index: torch.Tensor) -> None:
        self.buffer = self.buffer.index_select(0, index.to(self.buffer.device))


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in buffers that grow in place (see the module docstring).

    ``self.keys`` / ``self.values`` are views ``[B, Hkv, T, d]`` of the buffers, so everything in transformers that
    reads them (``get_seq_length``, mask sizes) sees an ordinary cache.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._k: _Rows | None = None
        self._v: _Rows | None = None
        self._derived: dict[str, tuple[_Rows, Callable[[torch.Tensor], torch.Tensor]]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._k is None:
            self.dtype, self.device = key_states.dtype, key_states.device
            self._k, self._v = _Rows(key_states), _Rows(value_states)
            self.is_initialized = True
        else:
            self._k.append(key_states)
            self._v.append(value_states)
        self.keys, self.values = self._k.view(), self._v.view()
        return self.keys, self.values

    def derived(self, key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``fn(keys)`` for every cached row, kept incrementally: ``fn`` runs only on rows added since the last call.

        Args:
            key: Names the derivation; two methods (or two settings of one) must use different keys.
            fn: Maps keys ``[B, Hkv, n, d]`` to ``[B, Hkv, n, w]``, row by row (row ``i`` of the output may depend
                only on row ``i`` of the input).

        Returns:
            ``[B, Hkv, T, w]``, a view of the derived buffer.
        """
        if self._k is None:
            raise RuntimeError("derived: the cache layer is empty; it is filled by the first forward")
        T = self._k.length
        entry = self._derived.get(key)
        if entry is None:
            rows = _Rows(fn(self.keys))
            self._derived[key] = (rows, fn)
        else:
            rows = entry[0]
            if rows.length < T:
                rows.append(fn(self.keys[:, :, rows.length :]))
        return rows.view()

    def _all_rows(self):
        yield from (r for r in (self._k, self._v) if r is not None)
        yield from (rows for rows, _ in self._derived.values())

    def reset(self) -> None:
        self._k = self._v = None
        self._derived = {}
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"tokens_to_remove: expected a negative count of rows to drop, got {tokens_to_remove}")
        if tokens_to_remove == 0 or self._k is None:
            return
        new_length = max(self._k.length + tokens_to_remove, 0)
        for rows in self._all_rows():
            rows.length = min(rows.length, new_length)
        self.keys, self.values = self._k.view(), self._v.view()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._k is None:
            return
        for rows in self._all_rows():
            rows.select_batch(indices)
        self.keys, self.values = self._k.view(), self._v.view()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._k is None:
            return
        index = torch.arange(self._k.buffer.shape[0], device=self._k.buffer.device).repeat_interleave(repeats)
        self.batch_select_indices(index)


class PrunelabCache(DynamicCache):
    """A :class:`transformers.DynamicCache` made of :class:`GrowingLayer` s (one per decoder layer).

    ``prunelab.apply`` on a decoder puts one in place of an empty default cache, so ``generate()`` and plain
    forwards use it without any change to the calling code.
    """

    def __init__(self, num_layers: int):
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers: expected an int >= 1, got {num_layers!r}")
        super(DynamicCache, self).__init__(layers=[GrowingLayer() for _ in range(num_layers)])
