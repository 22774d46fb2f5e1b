"""KV-cache baselines at FASA's budget: the oracle top-k, the sink + recent window and dense decoding.

They run through the decoder seam (``prunelab.common.decoder``) on the shared decode-step algorithm of
:class:`~prunelab.common.kv_selection.KVSelection` (budget rule, dense fallbacks, padding, grouped-query modes,
focused attention) and differ only in how they score cached tokens. ``SinkRecent`` follows StreamingLLM
(Xiao et al., ICLR 2024) with the 8 sinks of the StreamingLLM baseline in FASA's official repository
(``AMAP-ML/FASA-ICLR2026``); ``OracleTopK`` is the selection FASA approximates (the full logits ``q . k``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunelab.common.decoder import AttentionCall, DecoderSpec
from prunelab.common.kv_selection import FiniteQueries, KVSelection
from prunelab.common.validate import check_int

__all__ = ["OracleTopK", "SinkRecent", "DenseDecode"]


@dataclass(frozen=True)
class OracleTopK(KVSelection):
    """Keeps the top ``budget`` tokens of the full logits ``q . k`` (the selection FASA approximates)."""

    def layer_scorer(self, spec: DecoderSpec, layer_idx: int):
        def scores(call: AttentionCall) -> torch.Tensor:
            B, hq, _, d = call.query.shape
            hkv = call.keys.shape[1]
            return torch.matmul(call.query.view(B, hkv, hq // hkv, d), call.keys.transpose(-1, -2)).float()

        return scores


@dataclass(frozen=True)
class SinkRecent(KVSelection):
    """StreamingLLM-style: the first ``n_sink`` tokens plus the most recent ``budget - n_sink`` (no scoring).

    ``n_sink`` defaults to 8, the StreamingLLM setting of the official repository's baselines. Padding is
    skipped: sinks are the first real tokens of each sequence.

    The recent window always holds the current token: a token count ``budget <= n_sink`` is refused at
    construction, and when a step keeps ``n <= n_sink`` tokens (a fraction of a short context, or a context shorter
    than the budget) it keeps the current token and the first ``n - 1`` sinks.
    """

    n_sink: int = 8

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "n_sink", check_int(self.n_sink, "n_sink", low=0))
        if isinstance(self.budget, int) and self.budget <= self.n_sink:
            raise ValueError(f"n_sink: {self.n_sink} sinks leave no room for the current token in budget="
                             f"{self.budget}; use n_sink < budget")

    def layer_scorer(self, spec: DecoderSpec, layer_idx: int):
        def scores(call: AttentionCall) -> torch.Tensor:
            B, hkv, T, _ = call.keys.shape
            valid = call.valid if call.valid is not None else torch.ones(B, T, dtype=torch.bool,
                                                                          device=call.keys.device)
            rank = valid.cumsum(dim=-1) - 1  # position among real tokens
            recency = rank.float()
            # The current token (the step's own key, always the last position) first, then the sinks in order,
            # then the most recent tokens.
            s = torch.where(rank < self.n_sink, 3.0 * T - recency, recency)
            s[:, -1] = 4.0 * T
            return s[:, None, None, :].expand(B, hkv, spec.group, T)

        return scores


@dataclass(frozen=True)
class DenseDecode(KVSelection):
    """Dense attention through the same seam and cache: the fair baseline for decode-step timings."""

    def decoder_handler(self, spec: DecoderSpec):
        check_finite = FiniteQueries(spec.num_layers)

        def handler(call: AttentionCall) -> None:
            check_finite(call)  # the same NaN/inf check as the pruning methods, so timings compare like with like

        return handler
