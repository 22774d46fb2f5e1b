"""FASA stage A: offline calibration of each head's frequency-chunk agreement, saved per model (FASA §3).

For every layer ``l``, query head ``h`` and chunk ``j`` we measure the contextual agreement
``CA_K = |TopK(a) ∩ TopK(a^(j))| / K`` between the full head's ranking of cached tokens and the chunk's own
ranking, at decode-step queries, for each ``K`` of a grid, and average it. Stage B
(:func:`~prunelab.methods.fasa.chunks.dominant_chunks`) then keeps the best chunks per head.

Where we differ from the official profiler (``identify_important_fre.py`` of ``AMAP-ML/FASA-ICLR2026``):

- The decode-step queries are the last ``n_queries`` positions of each calibration window, all computed in one
  teacher-forced forward. A query at position ``t`` then sees exactly the cache a decode step at ``t`` would see
  (the text's tokens rather than the model's own greedy continuation). One forward per window instead of one
  per generated token makes calibration take seconds.
- The official repository has no script that turns the profiler's dumps into per-head agreement (its loader
  also expects file names the profiler does not write); this module is that aggregation: the mean over
  queries and windows.

The file is JSON, keyed by the model's name and revision, the chunk layout and the shapes; loading it for
another model raises an error naming ``calibration``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prunelab.common.decoder import AttentionCall, DecoderSpec

from .chunks import FC_LAYOUTS, chunk_logits, contextual_agreement

__all__ = ["Calibration", "calibrate", "DEFAULT_KS"]

DEFAULT_KS = (128, 256, 512, 1024, 2048, 4096)  # the official profiler's grid (card §2, stage A)


@dataclass
class Calibration:
    """Mean contextual agreement ``agreement[k, l, h, j]`` for budgets ``ks[k]`` of one model and chunk layout."""

    model: str
    revision: str
    fc_layout: str
    ks: tuple[int, ...]
    agreement: torch.Tensor  # float32 [len(ks), L, Hq, d/2]
    source: dict = field(default_factory=dict)  # what it was computed on, and with which code

    def __post_init__(self):
        if self.fc_layout not in FC_LAYOUTS:
            raise ValueError(f"fc_layout: expected one of {FC_LAYOUTS}, got {self.fc_layout!r}")
        self.ks = tuple(int(k) for k in self.ks)
        if self.agreement.dim() != 4 or self.agreement.shape[0] != len(self.ks):
            raise ValueError(f"agreement: expected [len(ks)={len(self.ks)}, L, Hq, d/2], got "
                             f"{tuple(self.agreement.shape)}")

    def check(self, spec: DecoderSpec, fc_layout: str) -> None:
        """Raise ``ValueError`` naming ``calibration`` unless this file belongs to the model and layout."""
        shape = (spec.num_layers, spec.num_heads, spec.head_dim // 2)
        if (self.model, self.revision) != (spec.name, spec.revision) or tuple(self.agreement.shape[1:]) != shape:
            raise ValueError(f"calibration: computed for {self.model!r} (revision {self.revision!r}, [L, Hq, d/2]="
                             f"{list(self.agreement.shape[1:])}) but the model is {spec.name!r} (revision "
                             f"{spec.revision!r}, {list(shape)}); run `prunelab calibrate fasa` for this model")
        if self.fc_layout != fc_layout:
            raise ValueError(f"calibration: computed with fc_layout={self.fc_layout!r}, but the method uses "
                             f"fc_layout={fc_layout!r}")

    def for_budget(self, budget: int | float, fallback_k: int = 1024) -> tuple[torch.Tensor, int]:
        """The ``[L, Hq, d/2]`` slice FASA's stage B uses for ``budget``, and its ``K``.

        The budget's own slice when it is an integer on the grid; otherwise the ``fallback_k`` slice (1024 in the
        official code), or the grid value closest to it in log scale when the grid lacks it.
        """
        if isinstance(budget, int) and budget in self.ks:
            k = budget
        else:
            k = min(self.ks, key=lambda x: (abs(math.log(x / fallback_k)), x))
        return self.agreement[self.ks.index(k)], k

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"model": self.model, "revision": self.revision, "fc_layout": self.fc_layout, "ks": list(self.ks),
                "shape": list(self.agreement.shape), "source": self.source,
                "agreement": [round(v, 5) for v in self.agreement.flatten().tolist()]}
        path.write_text(json.dumps(data))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        data = json.loads(Path(path).read_text())
        try:
            agreement = torch.tensor(data["agreement"], dtype=torch.float32).view(data["shape"])
            return cls(data["model"], data["revision"], data["fc_layout"], tuple(data["ks"]), agreement,
                       data.get("source", {}))
        except (KeyError, RuntimeError) as err:
            raise ValueError(f"calibration: {path} is not a FASA calibration file ({err})") from err


class _AgreementProbe:
    """A decoder method that runs dense attention and accumulates chunk agreement at prefill (see module doc)."""

    def __init__(self, ks: tuple[int, ...], n_queries: int, fc_layout: str, head_chunk: int = 4):
        self.ks, self.n_queries, self.fc_layout, self.head_chunk = ks, n_queries, fc_layout, head_chunk
        self.sums: dict[int, torch.Tensor] = {}
        self.windows = 0

    def decoder_handler(self, spec: DecoderSpec):
        def handler(call: AttentionCall):
            if not call.is_decode:
                self._accumulate(call, spec)
            return None  # always dense: calibration observes the unmodified model

        return handler

    def _accumulate(self, call: AttentionCall, spec: DecoderSpec) -> None:
        _, _, T, _ = call.query.shape
        nq = self.n_queries
        pos = torch.arange(T - nq, T, device=call.query.device)
        future = torch.arange(T, device=call.query.device)[None, :] > pos[:, None]  # [nq, T], causal
        total = torch.zeros(len(self.ks), spec.num_heads, spec.head_dim // 2)
        for b in range(call.query.shape[0]):
            for h0 in range(0, spec.num_heads, self.head_chunk):
                heads = torch.arange(h0, min(h0 + self.head_chunk, spec.num_heads))
                q = call.query[b, heads, T - nq :].float()  # [h, nq, d]
                k = call.keys[b, heads // spec.group].float()  # [h, T, d]: each query head reads its kv head
                full = (q @ k.transpose(-1, -2)).masked_fill(future, float("-inf"))
                part = chunk_logits(q, k, self.fc_layout).masked_fill(future, float("-inf"))  # [h, J, nq, T]
                ca = contextual_agreement(full, part.transpose(1, 2), self.ks)  # [nK, h, nq, J]
                total[:, heads] += ca.mean(dim=2).cpu()
        self.sums[call.layer_idx] = self.sums.get(call.layer_idx, 0) + total


@torch.no_grad()
def calibrate(model, windows: torch.Tensor, *, ks: tuple[int, ...] = DEFAULT_KS, n_queries: int = 64,
              fc_layout: str = "rope_pairs", progress: bool = True, source: dict | None = None) -> Calibration:
    """Measure every head's chunk agreement on calibration text (FASA stage A).

    Args:
        model: a supported transformers decoder (see ``prunelab.common.decoder``).
        windows: int64 token ids ``[n, L]``; each window is one forward, its last ``n_queries`` positions the
            decode-step queries. ``L >= max(ks) + n_queries`` so that every query sees at least ``max(ks)`` keys.
        ks: the budgets ``K`` to measure agreement at.
        n_queries: decode-step queries per window.
        fc_layout: ``"rope_pairs"`` (the paper) or ``"official_contiguous"``.
        progress: show a progress bar over windows.
        source: provenance to store in the file (what the text was).

    Returns:
        A :class:`Calibration`; ``.save(path)`` writes it.
    """
    import prunelab
    from prunelab.common.decoder import decoder_spec

    spec = decoder_spec(model)
    if fc_layout not in FC_LAYOUTS:
        raise ValueError(f"fc_layout: expected one of {FC_LAYOUTS}, got {fc_layout!r}")
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.int64:
        raise ValueError(f"windows: expected int64 token ids [n, L], got {getattr(windows, 'shape', windows)}")
    ks = tuple(sorted(set(ks)))
    if isinstance(n_queries, bool) or not isinstance(n_queries, int) or n_queries < 1:
        raise ValueError(f"n_queries: expected an int >= 1, got {n_queries!r}")
    if windows.shape[1] < max(ks) + n_queries:
        raise ValueError(f"ks: the largest K={max(ks)} needs windows of at least K + n_queries = "
                         f"{max(ks) + n_queries} tokens, got {windows.shape[1]}")
    from tqdm.auto import tqdm

    probe = _AgreementProbe(ks, n_queries, fc_layout)
    device = next(model.parameters()).device
    with prunelab.apply(model, probe):
        for w in tqdm(windows, desc="FASA calibration", disable=not progress):
            model(w[None].to(device), use_cache=False)
    agreement = torch.stack([probe.sums[i] for i in range(spec.num_layers)], dim=1) / len(windows)
    src = {"windows": int(windows.shape[0]), "window_len": int(windows.shape[1]), "n_queries": n_queries,
           **(source or {})}
    return Calibration(spec.name, spec.revision, fc_layout, ks, agreement, src)
