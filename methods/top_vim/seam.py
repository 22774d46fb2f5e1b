"""ToP-ViM's seam into :class:`~prunelab.methods.top_vim.vim.VisionMamba`: the layer loop with pruning blocks.

Paper: Zhan et al., "Exploring Token Pruning in Vision State Space Models", NeurIPS 2024 (arXiv 2409.18962). Official
code compared: ZLKong/ToP-ViM at b5bc231, ``vim/models_mamba.py`` (``forward_features``: the active gather-based
pruning block and the commented-out "token masking" variant).

``prunelab.apply(model, ToPViM(...))`` calls ``VisionMamba.prunelab_seam``, which sets ``forward``,
``forward_features`` and ``forward_tokens`` as instance attributes (``remove()`` deletes them, which restores the
class's methods bit for bit). After each pruning block the method scores the tokens from that block's scan outputs
and selects the survivors (under ``no_grad``: selection is not trained); then, by ``method.alignment``:

- ``"none"`` (physical removal, the official active path): hidden states and the separate residual stream are
  gathered to the kept tokens; the CLS index is tracked through the shorter sequences.
- ``"zero_slot"`` (default): the sequence keeps its length; hidden states and residual are multiplied by the keep
  mask. A zeroed slot stays exactly 0 in every later block with RMSNorm: the residual add gives 0, RMSNorm(0) = 0,
  ``in_proj`` (no bias) gives x = z = 0, so the gate silu(z) = 0 zeroes both scan outputs there and ``out_proj`` (no
  bias) returns 0; ``norm_f`` maps it to 0 and the head reads only the CLS. The slot still advances both scans: the
  state decays by exp(Δ_t A) and takes the input Δ_t B_t x_t, where x_t is the causal conv's leakage from the kept
  neighbours plus the conv bias. (LayerNorm's bias breaks the argument, so zero_slot needs RMSNorm.)
- ``"gapped"``: decay_only with the pruned slot's step taken as ``softplus(dt_bias)`` (its input-free value), run
  on the kept tokens only: hidden states and residual are gathered as under ``"none"``, and the later blocks get
  the kept tokens' original positions (``VimBlock(..., positions=)``): the causal conv reads the kept tokens where
  they lie, and each scan decays its state over every gap as the missing slots would. It equals a full-length
  decay-only run whose pruned slots carry that step, but computes K tokens instead of L: the speed path (on a GPU
  the same op is ``kernels/gapped_scan``).
- ``"decay_only"``: as zero_slot, and the keep mask goes to every later scan (``VimBlock(..., keep=)``): a pruned
  slot receives no input and outputs 0, but the state still decays by exp(Δ_t A). Δ_t there is whatever the block
  computes at the zeroed slot: softplus(dt_proj(x_proj(x_t)) + dt_bias) with x_t the conv leakage above. The
  paper's Eq. 5-6 leave Δ at pruned slots open; this choice adds no cache and no parameter, keeps every later block
  unchanged but for the scan's mask, and carries no feature of a pruned token forward (zeroing the slot before the
  conv is what keeps its features from leaking into its neighbours).

The handle's :class:`ToPViMState` holds, for the last forward, the kept original positions after each pruning
block, the importance maps over original positions, the tokens and scan slots per block and the per-image MACs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from prunelab.common.handle import Handle, UnsupportedModelError
from prunelab.methods.top_vim.flops import VimDims, vim_macs
from prunelab.methods.top_vim.selection import check_vim_reduction, cls_slot
from prunelab.methods.top_vim.vim import RMSNorm, VisionMamba

OVERRIDDEN = ("forward", "forward_features", "forward_tokens")

__all__ = ["ToPViMState", "ToPViMHandle", "pruned_tokens", "install"]


@dataclass
class ToPViMState:
    """What the last forward did.

    Attributes:
        kept: 1-based pruning block -> [B, K] int64, the original positions (0 .. M, CLS at M // 2) of the tokens
            kept after it; ascending, except under ``selection="official"`` (the official sequence order).
        importance: pruning block -> [B, N] float32 importance S over original positions; NaN at tokens pruned
            before that block. Under ``importance_source="official_bwd_unflipped"`` the map is the official
            (mirrored) one: position p holds the score the official code assigns to position p.
        cls_index: [B] int64, the CLS's index in the final token sequence (``forward_tokens``' output).
        tokens_per_block: tokens each block computes (outside the scan).
        slots_per_block: sequence slots each block's scans walk.
    """

    kept: dict[int, torch.Tensor] = field(default_factory=dict)
    importance: dict[int, torch.Tensor] = field(default_factory=dict)
    cls_index: torch.Tensor | None = None
    tokens_per_block: list[int] = field(default_factory=list)
    slots_per_block: list[int] = field(default_factory=list)

    @property
    def history(self) -> list[tuple[str, list[torch.Tensor]]]:
        """``(stage, [kept original positions of each image])`` after each pruning block (DToP's format)."""
        return [(f"block {b}", list(ids)) for b, ids in self.kept.items()]

    def macs(self, model: VisionMamba) -> int:
        """MACs of one image of the last forward (:func:`.flops.vim_macs`); every image costs the same."""
        return vim_macs(VimDims.from_model(model), self.tokens_per_block, self.slots_per_block)


class ToPViMHandle(Handle):
    """A :class:`Handle` that also exposes the last forward's :class:`ToPViMState` (``state``, ``kept``,
    ``importance``)."""

    def __init__(self, model, method, undo, *, state: ToPViMState):
        super().__init__(model, method, undo)
        self.state = state

    @property
    def kept(self) -> dict[int, torch.Tensor]:
        return self.state.kept

    @property
    def importance(self) -> dict[int, torch.Tensor]:
        return self.state.importance


def pruned_tokens(model: VisionMamba, method: Any, state: ToPViMState, x: torch.Tensor) -> torch.Tensor:
    """The tokens after ``norm_f`` with pruning: [B, M + 1, C] under the aligned modes (pruned slots 0), [B, K, C]
    (the kept tokens in sequence order) under ``"none"`` and ``"gapped"``. Fills ``state``."""
    blocks = set(method.prune_blocks(len(model.layers)))
    hidden, residual = model.embed(x), None
    B, N, _ = hidden.shape
    dev = hidden.device
    cls = torch.full((B,), model.layout.cls_index, dtype=torch.int64, device=dev)
    ids = torch.arange(N, device=dev).expand(B, N)  # original position of each slot of the current sequence
    alive: torch.Tensor | None = None  # aligned modes: [B, N] slots still holding a token; None: all
    physical = method.alignment in ("none", "gapped")  # the sequence shrinks to the kept tokens
    positions: torch.Tensor | None = None  # "gapped", once something is pruned: the kept tokens' original positions
    if hasattr(method, "start_forward"):  # per-forward state of a method (RandomVim's per-image generators)
        method.start_forward(B)
    kept, importance, tokens, slots = {}, {}, [], []
    for block, layer in enumerate(model.layers, start=1):
        tokens.append(hidden.shape[1] if alive is None else int(alive[0].sum()))
        slots.append(hidden.shape[1])
        scan_keep = alive if method.alignment == "decay_only" else None
        if block not in blocks:
            hidden, residual = layer(hidden, residual, keep=scan_keep, positions=positions)
            continue
        hidden, residual, ssm = layer(hidden, residual, return_ssm=True, keep=scan_keep, positions=positions)
        with torch.no_grad():
            scores = method.importance(ssm)
            red = method.select(scores, cls, alive=alive)
            if method.selection != "official":  # the official order moves the CLS: not an ascending index set
                check_vim_reduction(red, cls, grid=model.layout.grid if red.n == N else None, name=f"block {block}")
            heat = torch.full((B, N), float("nan"), device=dev).scatter(1, ids, scores.float())
            importance[block] = heat if alive is None else heat.masked_fill(~alive, float("nan"))
        if physical:
            cls = cls_slot(red, cls)
            if not red.is_identity:
                hidden, residual, ids = red.gather(hidden), red.gather(residual), red.gather(ids)
                if method.alignment == "gapped":
                    positions = ids
            kept[block] = ids
        else:
            kept[block] = red.keep
            mask = torch.zeros(B, N, dtype=torch.bool, device=dev).scatter_(1, red.keep, True)
            if not bool(mask.all()):
                alive = mask
                hidden = hidden * mask[..., None].to(hidden.dtype)
                residual = residual * mask[..., None].to(residual.dtype)
    state.kept, state.importance, state.cls_index = kept, importance, cls
    state.tokens_per_block, state.slots_per_block = tokens, slots
    return model.final_norm(hidden, residual)


def pruned_features(state: ToPViMState, tokens_fn, x: torch.Tensor) -> torch.Tensor:
    """The CLS token after ``norm_f``, [B, C], read at its tracked index."""
    tokens = tokens_fn(x)
    return tokens[torch.arange(tokens.shape[0], device=tokens.device), state.cls_index]


def install(model: Any, method: Any) -> ToPViMHandle:
    """Install ToP-ViM (a method with ``prune_blocks``, ``importance``, ``select``, ``alignment`` and ``selection``)
    into a :class:`VisionMamba`."""
    if not isinstance(model, VisionMamba):
        raise UnsupportedModelError(f"model: {type(model).__name__} is not a prunelab VisionMamba")
    if not all(hasattr(method, a) for a in ("prune_blocks", "importance", "select", "alignment", "selection")):
        raise TypeError(f"method: {type(method).__name__} has no Vision Mamba adapter (it needs prune_blocks, "
                        "importance, select, alignment and selection)")
    method.prune_blocks(len(model.layers))  # an error naming blocks, before anything is installed
    if method.alignment == "zero_slot" and not all(isinstance(m.norm, RMSNorm) for m in model.layers):
        raise ValueError("alignment: 'zero_slot' needs RMSNorm blocks (LayerNorm's bias revives a zeroed slot); "
                         "use 'decay_only', 'gapped' or 'none' on this model")
    if any(name in vars(model) for name in OVERRIDDEN):
        raise RuntimeError("model: the Vision Mamba's forward is already overridden")
    state = ToPViMState()
    tokens_fn = functools.partial(pruned_tokens, model, method, state)
    features_fn = functools.partial(pruned_features, state, tokens_fn)
    model.forward_tokens = tokens_fn
    model.forward_features = features_fn
    model.forward = lambda x: model.head(features_fn(x))

    def undo() -> None:
        for name in OVERRIDDEN:
            vars(model).pop(name, None)

    return ToPViMHandle(model, method, undo, state=state)
