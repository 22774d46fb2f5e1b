"""FASA as a decoder method: ``with prunelab.apply(model, FASA(...)): model.generate(...)``.

*FASA: Frequency-aware Sparse Attention* (Wang et al., ICLR 2026, arXiv 2602.03152); official code
``AMAP-ML/FASA-ICLR2026`` (Apache-2.0), read for behaviour, not copied. Differences are listed in README.md.

At a decode step in a layer >= 1, FASA scores every cached token with the partial logit over the dominant dims
of each query head (no softmax, no scaling), keeps the top ``budget`` tokens and attends exactly over them
(:class:`~prunelab.common.kv_selection.KVSelection`).

Layout of the partial logit (CPU- and memory-friendly, exact): for each key/value head the union ``U`` of its
query heads' dominant dims is kept as a contiguous derived cache ``k_dom [B, Hkv, T, |U|]``; each query head
multiplies its query restricted to ``U`` and zeroed outside its own dims, so the scores are exactly
``q[D_h] . k[D_h]`` while the cache is read once per key/value head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from prunelab.common.decoder import AttentionCall, DecoderSpec
from prunelab.common.kv_selection import KVSelection
from prunelab.common.validate import check_choice, check_int, check_real

from .calibration import Calibration
from .chunks import FC_LAYOUTS, dominant_chunks, dominant_dims

__all__ = ["FASA"]


@dataclass(frozen=True)
class FASA(KVSelection):
    """FASA-C (the full cache stays; each decode step reads the dominant dims and the selected rows).

    Fields:
        budget: tokens kept per step: a count (256: the abstract's LongBench point, official
            scripts) or a fraction of the current cache (the abstract's 18.9 %).
        calibration: a :class:`Calibration` or the path of its file (``prunelab calibrate fasa``); required.
        n_fc: dominant frequency chunks per head; 16 in every official run script. Must be in ``1..d/2``.
        fc_select: ``"topk"`` (the scripts: min_k = max_k = n_fc) or ``"quantile"`` (tau, clamped to n_fc).
        tau: the quantile for ``fc_select="quantile"``; 0.8 in the official code.
        dense_layers: layers that always attend densely; layer 0 in the paper (``layer_control = -1``).
        gqa_mode: ``per_q_head`` (the paper), ``shared_sum`` or ``shared_max`` (one set per key/value head).
        fc_layout: ``rope_pairs`` (the paper's chunks) or ``official_contiguous`` (the official code's).
        fallback_k: the calibration budget whose agreement ranks chunks when ``budget`` is not on the grid
            (1024 in the official loader).
        impl: ``"auto"`` uses the Triton kernels on CUDA (per-query-head mode, no padding), else torch.
    """

    calibration: Calibration | str | Path | None = None
    n_fc: int = 16
    fc_select: str = "topk"
    tau: float = 0.8
    fc_layout: str = "rope_pairs"
    fallback_k: int = 1024
    impl: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.calibration is not None and not isinstance(self.calibration, (Calibration, str, Path)):
            raise ValueError(f"calibration: expected a Calibration or the path of its file, got "
                             f"{type(self.calibration).__name__}")
        object.__setattr__(self, "n_fc", check_int(self.n_fc, "n_fc", low=1))
        check_choice(self.fc_select, "fc_select", ("topk", "quantile"))
        object.__setattr__(self, "tau", check_real(self.tau, "tau", low=0.0, high=1.0))
        check_choice(self.fc_layout, "fc_layout", FC_LAYOUTS)
        object.__setattr__(self, "fallback_k", check_int(self.fallback_k, "fallback_k", low=1))
        check_choice(self.impl, "impl", ("auto", "torch", "triton"))

    def calibration_for(self, spec: DecoderSpec, model=None) -> Calibration:
        """The calibration, loaded if it is a path and checked against the shapes (and, given ``model``, against its
        name, revision and weights: :meth:`Calibration.check`)."""
        cal = self.calibration
        if cal is None:
            raise ValueError(f"calibration: FASA needs the chunk agreement of this {spec.model_type} model; compute "
                             "it with `prunelab calibrate fasa` (or methods.fasa.calibrate) and pass the file")
        cal = cal if isinstance(cal, Calibration) else Calibration.load(cal)
        cal.check(spec, self.fc_layout, model)
        return cal

    def check_model(self, model) -> None:
        """Raise ``ValueError`` naming ``calibration`` unless it was computed on ``model``: name, revision, shapes
        and weights.

        :meth:`decoder_handler` sees only the shapes (:class:`DecoderSpec`) and compares only those; the decoder seam
        (``install_decoder``) calls this with the model before it builds the handler.
        """
        from prunelab.common.decoder import decoder_spec

        self.calibration_for(decoder_spec(model), model)

    def dominant_dim_mask(self, spec: DecoderSpec) -> torch.Tensor:
        """bool ``[L, Hq, d]``: the dims each head scores with (stage B on the calibration)."""
        if self.n_fc > spec.head_dim // 2:
            raise ValueError(f"n_fc: expected 1..d/2={spec.head_dim // 2} for this model, got {self.n_fc}")
        agreement, _ = self.calibration_for(spec).for_budget(self.budget, self.fallback_k)
        chunks = dominant_chunks(agreement, self.n_fc, self.fc_select, self.tau)
        return dominant_dims(chunks, self.fc_layout)

    def scorers(self, spec: DecoderSpec) -> dict:
        dims = self.dominant_dim_mask(spec)  # stage B once, then one scorer per layer
        return {i: _PartialScorer(dims[i], spec, f"fasa:{i}:{self.fc_layout}", self.impl)
                for i in range(spec.num_layers) if i not in self.dense_layers}


class _PartialScorer:
    """Scores ``q[D_h] . k[D_h]`` per query head through one contiguous ``k_dom`` per key/value head."""

    def __init__(self, dims: torch.Tensor, spec: DecoderSpec, tag: str, impl: str):
        hkv, g, d = spec.num_kv_heads, spec.group, spec.head_dim
        per_kv = dims.view(hkv, g, d)
        union = per_kv.any(dim=1)  # [Hkv, d]
        width = int(union.sum(dim=1).max())
        # Put each kv head's union first (ascending), then pad with its other dims to a common width.
        order = torch.sort((~union).to(torch.int8), dim=1, stable=True).indices
        self.u_index = order[:, :width].contiguous()  # [Hkv, U]
        self.q_mask = per_kv.gather(2, self.u_index[:, None, :].expand(hkv, g, width)).float()  # [Hkv, g, U]
        self.impl = impl
        m = dims.sum(dim=1)
        # The kernels take the same number of dims for every head, as topk chunk selection gives.
        self.dim_index = dims.nonzero()[:, 1].view(dims.shape[0], -1) if bool((m == m[0]).all()) else None
        self.key = f"{tag}:{hash(tuple(self.u_index.flatten().tolist()))}"
        self.width = width

    def k_dom(self, keys: torch.Tensor) -> torch.Tensor:
        index = self.u_index.to(keys.device)
        return torch.stack([keys[:, h].index_select(-1, index[h]) for h in range(keys.shape[1])], dim=1)

    def fused(self, call: AttentionCall, n: torch.Tensor) -> torch.Tensor | None:
        """The Triton pair (score + top-k, then indexed decode attention) on CUDA, for unpadded batches."""
        from prunelab.kernels.dispatch import resolve_impl

        if self.dim_index is None or call.valid is not None or resolve_impl(self.impl, call.query) != "triton":
            return None
        from prunelab.kernels.partial_score_topk import partial_score_topk
        from prunelab.kernels.sparse_decode_attention import sparse_decode_attention

        q = call.query[:, :, 0]
        index = partial_score_topk(q, call.keys, self.dim_index.to(q.device), int(n), impl="triton")
        out = sparse_decode_attention(q, call.keys, call.values, index, scale=call.scaling, impl="triton")
        return out[:, :, None]

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        B, hq, _, d = call.query.shape
        hkv = call.keys.shape[1]
        k_dom = call.layer.derived(self.key, self.k_dom) if call.layer is not None else self.k_dom(call.keys)
        q = call.query.view(B, hkv, hq // hkv, d)
        q_dom = q.gather(3, self.u_index.to(q.device)[None, :, None, :].expand(B, hkv, hq // hkv, self.width))
        q_dom = q_dom * self.q_mask.to(q.device, q.dtype)
        return torch.matmul(q_dom, k_dom.transpose(-1, -2)).float()  # [B, Hkv, g, T]
