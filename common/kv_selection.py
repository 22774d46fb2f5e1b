"""Decode-time KV selection in the decoder seam: score cached tokens, keep the top budget, attend exactly.

KV-cache methods that differ only in how they score cached tokens share :class:`KVSelection`: the budget rule,
the dense fallbacks, padding, grouped-query modes, the NaN/inf check of decode queries (:class:`FiniteQueries`)
and the focused attention. A subclass defines :meth:`KVSelection.layer_scorer` (FASA in
``prunelab.methods.fasa``; the oracle top-k and the sink + recent window in ``prunelab.methods.baselines.kv``).

Budget (FASA's decode step, as in the official ``monkey_patch/frequency/utils.py`` of ``AMAP-ML/FASA-ICLR2026``,
*FASA: Frequency-aware Sparse Attention*, Wang et al., ICLR 2026): ``N = budget`` for an int,
``floor(budget * t)`` for a fraction, where ``t`` is the sequence's cache length without padding; then
``N = min(N, t)`` and at least 1. When every sequence keeps its whole cache the layer runs transformers' dense
SDPA path unchanged, so a budget above the length is exactly dense. Prefill (more than one query) and the
``dense_layers`` are always dense.

Grouped-query attention (``gqa_mode``): ``per_q_head`` (the paper) keeps a set per query head;
``shared_sum`` / ``shared_max`` pool the scores of a key/value head's query heads and keep one set per key/value
head, which reads each selected row once (a bytes saving under GQA, and a different method).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunelab.common.attend import attend_selected, valid_lengths
from prunelab.common.decoder import AttentionCall, DecoderSpec
from prunelab.common.validate import check_budget, check_choice, check_ints

__all__ = ["GQA_MODES", "FiniteQueries", "KVSelection", "budget_counts"]

GQA_MODES = ("per_q_head", "shared_sum", "shared_max")


def budget_counts(budget: int | float, lengths: int | torch.Tensor) -> int | torch.Tensor:
    """Tokens kept per sequence, in ``1..lengths`` (see the module docstring).

    ``lengths`` is an int (one length for the whole batch: the unpadded hot path, no tensor work) or int64 ``[B]``.
    """
    if isinstance(lengths, int):
        n = budget if isinstance(budget, int) else int(budget * lengths)
        return max(1, min(n, lengths))
    if isinstance(budget, float):
        n = torch.floor(budget * lengths.double()).long()
    else:
        n = torch.full_like(lengths, budget)
    return torch.minimum(n, lengths).clamp(min=1)


class FiniteQueries:
    """Raises ``ValueError`` when a decode-step query is NaN or inf, naming the first layer where it is.

    CONTRIBUTING promises that NaN activations raise. The query is the cheapest tensor to check (``[B, Hq, 1, d]``
    per layer, never the cache) and every upstream NaN reaches it: a NaN in the cache or in a layer's output
    reaches the next layer's query through attention and the residual stream. Each layer's flag stays on the
    device and the flags are read once per step, at the last layer, so the check costs one host sync per decode
    step rather than one per layer. Prefill is not checked (its padded rows may hold anything).
    """

    def __init__(self, num_layers: int):
        self.last = num_layers - 1
        self.flags: dict[int, torch.Tensor] = {}

    def __call__(self, call: AttentionCall) -> None:
        if not call.is_decode:
            return
        self.flags[call.layer_idx] = torch.isfinite(call.query).all()
        if call.layer_idx == self.last:
            flags, self.flags = self.flags, {}
            ok = torch.stack([f.to(call.query.device) for f in flags.values()])
            if not bool(ok.all()):
                layer = list(flags)[int((~ok).nonzero()[0, 0])]
                raise ValueError(f"query: NaN/inf in the decode-step query at layer {layer}")


def _rows_read(index: torch.Tensor, keep: torch.Tensor | None, spec: DecoderSpec) -> tuple[int, int]:
    """Selected cache rows of one step: distinct per key/value head (the least any kernel must read), and as
    gathered (one read per query head in ``per_q_head`` mode)."""
    B, heads, _ = index.shape
    T = int(index.max()) + 1
    member = torch.zeros(B, heads, T, dtype=torch.bool)
    member.scatter_(2, index.cpu(), True if keep is None else keep.cpu())
    distinct = member.view(B, spec.num_kv_heads, -1, T).any(dim=2).sum()
    return int(distinct), int(member.sum())


@dataclass(frozen=True)
class KVSelection:
    """Shared fields and the decode-step algorithm; subclasses define :meth:`layer_scorer`."""

    budget: int | float = 256
    dense_layers: tuple[int, ...] = (0,)
    gqa_mode: str = "per_q_head"

    def __post_init__(self):
        # Normalised to plain Python types: numpy.int64 is a count, numpy.float64 a fraction.
        object.__setattr__(self, "budget", check_budget(self.budget))
        object.__setattr__(self, "dense_layers", check_ints(self.dense_layers, "dense_layers", low=0))
        check_choice(self.gqa_mode, "gqa_mode", GQA_MODES)

    # -- to define in subclasses ------------------------------------------------------------------------------
    def layer_scorer(self, spec: DecoderSpec, layer_idx: int):
        """A function ``call -> scores [B, Hkv, g, T]`` (larger = keep) for one layer.

        A scorer may also define ``fused(call, n) -> output | None``: a kernel path that selects and attends in
        one go (used when it returns a tensor).
        """
        raise NotImplementedError

    def scorers(self, spec: DecoderSpec) -> dict:
        """The scorer of every layer that is not dense."""
        return {i: self.layer_scorer(spec, i) for i in range(spec.num_layers) if i not in self.dense_layers}

    # -- the shared algorithm ---------------------------------------------------------------------------------
    def decoder_handler(self, spec: DecoderSpec):
        bad = [i for i in self.dense_layers if i >= spec.num_layers]
        if bad:
            raise ValueError(f"dense_layers: {bad} outside the model's {spec.num_layers} layers")
        scorers = self.scorers(spec)
        check_finite = FiniteQueries(spec.num_layers)

        def handler(call: AttentionCall) -> torch.Tensor | None:
            check_finite(call)
            if not call.is_decode or call.layer_idx not in scorers:
                return None
            B, T = call.keys.shape[0], call.keys.shape[2]
            if call.valid is None:  # no padding: plain ints, no tensor bookkeeping on the hot path
                n = budget_counts(self.budget, T)
                if n >= T:
                    return None  # keeps every token: exactly the dense path
            else:
                lengths = valid_lengths(call.valid, B, T, call.keys.device)
                n = budget_counts(self.budget, lengths)
                if bool((n >= lengths).all()):
                    return None
            scorer = scorers[call.layer_idx]
            fused = getattr(scorer, "fused", None)
            out = fused(call, n) if fused is not None and self.gqa_mode == "per_q_head" else None
            if out is not None:
                return out
            index, keep = self.select(scorer(call), call.valid, n)  # scores [B, Hkv, g, T]
            if handler.record is not None:
                handler.record[call.layer_idx] = _rows_read(index, keep, spec)
            return attend_selected(call.query, call.keys, call.values, index, keep, call.scaling)

        handler.record = None  # set to a dict to record {layer: (distinct rows, rows as gathered)} per step
        return handler

    def select(self, scores: torch.Tensor, valid: torch.Tensor | None, n: int | torch.Tensor):
        """Top-``n[b]`` positions of ``scores [B, Hkv, g, T]`` per query head or per key/value head.

        Returns ``(index, keep)``: int64 ``[B, Hq or Hkv, max(n)]`` (unsorted: attention does not depend on
        order) and the bool mask of entries within each sequence's ``n[b]`` (``None`` when all are).
        """
        B, hkv, g, T = scores.shape
        if valid is not None:
            scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        if self.gqa_mode == "shared_sum":
            scores = scores.sum(dim=2)
        elif self.gqa_mode == "shared_max":
            scores = scores.amax(dim=2)
        else:
            scores = scores.reshape(B, hkv * g, T)
        if isinstance(n, int):
            return scores.topk(n, dim=-1, sorted=False).indices, None
        n_max = int(n.max())
        ragged = bool((n < n_max).any())
        index = scores.topk(n_max, dim=-1, sorted=ragged).indices  # sorted: rank < n[b] is the top n[b]
        keep = None
        if ragged:
            keep = (torch.arange(n_max, device=n.device)[None, :] < n[:, None])[:, None, :].expand_as(index)
        return index, keep
