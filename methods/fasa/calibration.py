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

The file is JSON. It records the chunk layout and a fingerprint of the model it was computed on: the model's name
and revision (``prunelab.common.hf.model_source``), its ``model_type``, shapes and RoPE base, and 64 entries of
each of layer 0's ``q_proj`` / ``k_proj`` weights (:func:`weights_fingerprint`). Installing FASA with the
calibration of another model raises an error naming ``calibration`` and what differs. Files written before the
fingerprint existed are refused with the command that rewrites them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prunelab.common.decoder import AttentionCall, DecoderSpec
from prunelab.common.hf import model_source
from prunelab.common.validate import check_choice, check_int, check_ints

from .chunks import FC_LAYOUTS, chunk_logits, contextual_agreement

__all__ = ["Calibration", "calibrate", "DEFAULT_KS", "spec_fingerprint", "weights_fingerprint"]

FINGERPRINT_SAMPLES = 64  # entries of each of layer 0's q_proj / k_proj weights in a calibration's fingerprint
RERUN = "re-run `prunelab calibrate fasa --model <this model> --out FILE` (or methods.fasa.calibrate)"

DEFAULT_KS = (128, 256, 512, 1024, 2048, 4096)  # the official profiler's grid (identify_important_fre.py)


def spec_fingerprint(spec: DecoderSpec) -> dict:
    """What the config says about a model: its type, shapes and RoPE base."""
    return {"model_type": spec.model_type, "num_layers": spec.num_layers, "num_heads": spec.num_heads,
            "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim, "rope_theta": spec.rope_theta}


def weights_fingerprint(model) -> dict | None:
    """A cheap fingerprint of a decoder's weights, the same on every device and in every process.

    Exactly what is read: the attention module with ``layer_idx == 0``; of its ``q_proj.weight`` and
    ``k_proj.weight`` each, the entries ``w.reshape(-1)[i * s]`` for ``i = 0..63`` with ``s = w.numel() // 64``
    (a fixed strided slice over all rows), as float32 values; and the weights' dtype. Values rather than a hash,
    so that a file computed in float32 can serve the same weights loaded in bfloat16 (:func:`same_weights`).

    Returns:
        ``{"dtype", "q_proj", "k_proj"}``, or ``None`` when layer 0's weights are not in memory (meta device).
    """
    attn = next((m for m in model.modules() if getattr(m, "layer_idx", None) == 0 and hasattr(m, "q_proj")
                 and hasattr(m, "k_proj")), None)
    if attn is None:
        raise ValueError(f"model: {type(model).__name__} has no attention module with layer_idx 0 (q_proj, k_proj)")
    out = {"dtype": str(attn.q_proj.weight.dtype).removeprefix("torch.")}
    for name in ("q_proj", "k_proj"):
        w = getattr(attn, name).weight.detach()
        if w.is_meta:
            return None
        flat = w.reshape(-1)
        out[name] = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)][:FINGERPRINT_SAMPLES].float().cpu().tolist()
    return out


def _eps(dtype: str) -> float:
    try:
        return float(torch.finfo(getattr(torch, dtype)).eps)
    except (AttributeError, TypeError):  # an integer (quantised) dtype: only exact matches
        return 0.0


def same_weights(a: dict, b: dict) -> bool:
    """Whether two :func:`weights_fingerprint` s are of the same weights.

    In the same dtype the entries must be equal. Across dtypes each entry may differ by the rounding of the coarser
    dtype (relative ``eps``, twice the round-to-nearest bound; ``2**-24`` absolute for float16's subnormals).
    """
    x = torch.tensor(a["q_proj"] + a["k_proj"], dtype=torch.float64)
    y = torch.tensor(b["q_proj"] + b["k_proj"], dtype=torch.float64)
    if x.shape != y.shape:
        return False
    if a["dtype"] == b["dtype"]:
        return bool(torch.equal(x, y))
    tol = max(_eps(a["dtype"]), _eps(b["dtype"]))
    return bool(((x - y).abs() <= tol * torch.maximum(x.abs(), y.abs()) + 2.0**-24).all())


@dataclass
class Calibration:
    """Mean contextual agreement ``agreement[k, l, h, j]`` for budgets ``ks[k]`` of one model and chunk layout.

    ``model`` and ``revision`` name the weights it was computed on (``prunelab.common.hf.model_source``; ``""`` when
    unknown). ``fingerprint`` is :func:`spec_fingerprint` plus ``"weights"`` (:func:`weights_fingerprint`);
    :func:`calibrate` fills it in. A calibration without one cannot be installed.
    """

    model: str
    revision: str
    fc_layout: str
    ks: tuple[int, ...]
    agreement: torch.Tensor  # float32 [len(ks), L, Hq, d/2]
    source: dict = field(default_factory=dict)  # what it was computed on, and with which code
    fingerprint: dict | None = None

    def __post_init__(self):
        check_choice(self.fc_layout, "fc_layout", FC_LAYOUTS)
        self.ks = check_ints(self.ks, "ks", low=1)
        if self.fingerprint is not None and not isinstance(self.fingerprint, dict):
            raise ValueError(f"fingerprint: expected a dict (spec_fingerprint + weights) or None, got "
                             f"{type(self.fingerprint).__name__}")
        if self.agreement.dim() != 4 or self.agreement.shape[0] != len(self.ks):
            raise ValueError(f"agreement: expected [len(ks)={len(self.ks)}, L, Hq, d/2], got "
                             f"{tuple(self.agreement.shape)}")
        bad = int((~torch.isfinite(self.agreement)).sum())
        if bad:
            raise ValueError(f"calibration: {bad} of {self.agreement.numel()} agreement values are NaN or inf; {RERUN}")
        if bool(((self.agreement < 0) | (self.agreement > 1)).any()):
            raise ValueError(f"calibration: agreement values must lie in [0, 1] (a fraction of K), got "
                             f"{float(self.agreement.min())}..{float(self.agreement.max())}; {RERUN}")

    def check(self, spec: DecoderSpec, fc_layout: str, model=None) -> None:
        """Raise ``ValueError`` naming ``calibration`` and what differs unless this belongs to the model and layout.

        Always compared: :func:`spec_fingerprint` and the agreement's shape. When ``model`` is given, also its name
        and revision (``prunelab.common.hf.model_source``) and, when both sides have them, the weights
        (:func:`same_weights`).
        """
        if self.fingerprint is None:
            raise ValueError(f"calibration: computed for {self.model!r} without a fingerprint of the model's "
                             f"weights and shapes (an older file or a hand-made Calibration); {RERUN}")
        theirs, ours = spec_fingerprint(spec), self.fingerprint
        if model is not None:
            name, revision = model_source(model)
            theirs = {"name": name, "revision": revision, **theirs}
            ours = {"name": self.model, "revision": self.revision, **ours}
        diff = [f"{key} {ours.get(key)!r} != {value!r}" for key, value in theirs.items() if ours.get(key) != value]
        shape = [spec.num_layers, spec.num_heads, spec.head_dim // 2]
        if list(self.agreement.shape[1:]) != shape:
            diff.append(f"agreement [L, Hq, d/2] {list(self.agreement.shape[1:])} != {shape}")
        if model is not None and not diff:
            theirs, ours = weights_fingerprint(model), self.fingerprint.get("weights")
            if theirs is not None and ours is not None and not same_weights(ours, theirs):
                diff.append(f"weights (layer 0 q_proj/k_proj entries, {ours['dtype']} vs {theirs['dtype']}) differ")
        if diff:
            raise ValueError(f"calibration: computed for another model (calibration != model: {'; '.join(diff)}); "
                             f"{RERUN}")
        if self.fc_layout != fc_layout:
            raise ValueError(f"calibration: computed with fc_layout={self.fc_layout!r}, but the method uses "
                             f"fc_layout={fc_layout!r}")

    def for_budget(self, budget: int | float, fallback_k: int = 1024) -> tuple[torch.Tensor, int]:
        """The ``[L, Hq, d/2]`` slice FASA's stage B uses for ``budget``, and its ``K``.

        The budget's own slice when it is an integer on the grid; otherwise the ``fallback_k`` slice (1024 in the
        official code), or the grid value closest to it in log scale when the grid lacks it.
        """
        fallback_k = check_int(fallback_k, "fallback_k", low=1)
        if isinstance(budget, int) and budget in self.ks:
            k = budget
        else:
            k = min(self.ks, key=lambda x: (abs(math.log(x / fallback_k)), x))
        return self.agreement[self.ks.index(k)], k

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"model": self.model, "revision": self.revision, "fingerprint": self.fingerprint,
                "fc_layout": self.fc_layout, "ks": list(self.ks), "shape": list(self.agreement.shape),
                "source": self.source, "agreement": [round(v, 5) for v in self.agreement.flatten().tolist()]}
        path.write_text(json.dumps(data))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a file written by :meth:`save`; every problem with it raises naming ``calibration`` and the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"calibration: {path} is not a file; compute one with `prunelab calibrate fasa`")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"calibration: {path} is not a FASA calibration file: not valid JSON, perhaps empty "
                             f"or truncated ({err}); {RERUN}") from err
        if isinstance(data, dict) and "agreement" in data and "fingerprint" not in data:
            raise ValueError(f"calibration: {path} was written by an older prunelab, without the model's fingerprint; "
                             f"{RERUN}")
        try:
            agreement = torch.tensor(data["agreement"], dtype=torch.float32).view(data["shape"])
            return cls(data["model"], data["revision"], data["fc_layout"], tuple(data["ks"]), agreement,
                       data.get("source", {}), data["fingerprint"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"calibration: {path} is not a valid FASA calibration file ({err})") from err


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
    check_choice(fc_layout, "fc_layout", FC_LAYOUTS)
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.int64:
        raise ValueError(f"windows: expected int64 token ids [n, L], got {getattr(windows, 'shape', windows)}")
    ks = tuple(sorted(set(check_ints(ks, "ks", low=1))))
    if not ks:
        raise ValueError("ks: expected at least one budget K")
    n_queries = check_int(n_queries, "n_queries", low=1)
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
    fingerprint = {**spec_fingerprint(spec), "weights": weights_fingerprint(model)}
    name, revision = model_source(model)
    return Calibration(name, revision, fc_layout, ks, agreement, src, fingerprint)
