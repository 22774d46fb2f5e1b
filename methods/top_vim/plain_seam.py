"""ToP-ViM's seam into :class:`~prunelab.methods.top_vim.plain_mamba.PlainMamba`: the layer loop with pruning blocks.

Paper: Zhan et al., "Exploring Token Pruning in Vision State Space Models", NeurIPS 2024 (arXiv 2409.18962). The
official code (ZLKong/ToP-ViM at b5bc231) has no PlainMamba path, so this adapter follows the paper's description:
tokens are scored by the SSM output before ``out_proj``, and the kept tokens are scanned in each zig-zag order over
the *full* grid, the pruned cells flagged by their positions.

``prunelab.apply(model, ToPViM(alignment="gapped", ...))`` calls ``PlainMamba.prunelab_seam``, which sets
``forward``, ``forward_features`` and ``forward_tokens`` as instance attributes (``remove()`` deletes them). After each
pruning block the method scores the tokens from that block's gated scan output (all four directions summed, in token
order; there is no backward "flip" to get wrong) and keeps the best ``ceil(n * keep_ratio)`` of the n it sees (no CLS:
every token is a candidate; :func:`.selection.plain_keep_count`). Later blocks compute only the kept tokens
(``positions``: their raster cells): the depthwise conv reads 0 at pruned cells, and the scans, by ``alignment``:

- ``"gapped"``: over every run of g pruned cells in its order a scan's state decays by exp(g softplus(dt_bias) A)
  with no input: decay_only with the pruned slot's input-free step, as for Vim. Each survivor keeps its scan
  neighbourhood and its decay distances (the paper's hidden-state alignment).
- ``"none"``: the scans go from kept token to kept token as if they were adjacent (no decay over the gaps): the
  survivors' scan distances shrink as under physical removal, the naive baseline. (Physically removing tokens from
  PlainMamba is not defined otherwise: its conv and its scan orders need the grid.)

``"zero_slot"`` and ``"decay_only"`` are refused: PlainMamba's LayerNorm and ``in_proj`` biases make a zeroed slot
nonzero again. The head reads ``ln1`` and the mean of the kept tokens.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from prunelab.common.handle import UnsupportedModelError
from prunelab.methods.top_vim.flops import PlainDims, plain_mamba_macs
from prunelab.methods.top_vim.plain_mamba import PlainMamba
from prunelab.methods.top_vim.seam import OVERRIDDEN, ToPViMHandle, ToPViMState
from prunelab.methods.top_vim.selection import plain_keep_count, select_plain

PLAIN_ALIGNMENTS = ("gapped", "none")

__all__ = ["PLAIN_ALIGNMENTS", "PlainToPState", "plain_tokens_per_block", "install"]


class PlainToPState(ToPViMState):
    """:class:`ToPViMState` for PlainMamba: ``kept`` holds raster cells (0 .. H W - 1), ``cls_index`` is None and
    :meth:`macs` counts with :func:`.flops.plain_mamba_macs`."""

    def macs(self, model: PlainMamba, scan_convention: str = "prunelab") -> int:
        return plain_mamba_macs(PlainDims.from_model(model), self.tokens_per_block, scan_convention)


def plain_tokens_per_block(method: Any, num_tokens: int, depth: int) -> list[int]:
    """Tokens each of the ``depth`` blocks computes under ``method``'s schedule on a grid of ``num_tokens`` cells."""
    return method.tokens_per_block(num_tokens, depth, count=plain_keep_count)


def pruned_tokens(model: PlainMamba, method: Any, state: PlainToPState, x: torch.Tensor) -> torch.Tensor:
    """The kept tokens after the last layer (before ``ln1``), [B, K, C] in raster order. Fills ``state``."""
    blocks = set(method.prune_blocks(len(model.layers)))
    hidden = model.embed(x)
    B, L, _ = hidden.shape
    ids = torch.arange(L, device=hidden.device).expand(B, L)  # raster cell of each token
    positions = None
    gap = "bias" if method.alignment == "gapped" else None
    if hasattr(method, "start_forward"):
        method.start_forward(B)
    kept, importance, tokens = {}, {}, []
    for block, layer in enumerate(model.layers, start=1):
        tokens.append(hidden.shape[1])
        if block not in blocks:
            hidden = layer(hidden, model.grid, positions, gap)
            continue
        hidden, ssm = layer(hidden, model.grid, positions, gap, return_ssm=True)
        with torch.no_grad():
            scores = method.importance(ssm)
            red = select_plain(scores, method.keep_ratio)
            importance[block] = torch.full((B, L), float("nan"), device=hidden.device).scatter(1, ids, scores.float())
        if not red.is_identity:
            hidden, ids = red.gather(hidden), red.gather(ids)
            positions = ids
        kept[block] = ids
    state.kept, state.importance, state.tokens_per_block = kept, importance, tokens
    state.slots_per_block = list(tokens)  # the gaps decay in one step with the next kept token
    return hidden


def install(model: Any, method: Any) -> ToPViMHandle:
    """Install ToP-ViM (``prune_blocks``, ``importance``, ``keep_ratio``, ``alignment``, ``selection``) into a
    :class:`PlainMamba`."""
    if not isinstance(model, PlainMamba):
        raise UnsupportedModelError(f"model: {type(model).__name__} is not a prunelab PlainMamba")
    if not all(hasattr(method, a) for a in ("prune_blocks", "importance", "keep_ratio", "alignment", "selection")):
        raise TypeError(f"method: {type(method).__name__} has no PlainMamba adapter (it needs prune_blocks, "
                        "importance, keep_ratio, alignment and selection)")
    method.prune_blocks(len(model.layers))
    if method.alignment not in PLAIN_ALIGNMENTS:
        raise ValueError(f"alignment: PlainMamba supports {PLAIN_ALIGNMENTS}, got {method.alignment!r} (its "
                         "LayerNorm and in_proj biases make a zeroed slot nonzero again)")
    if method.selection != "global":
        raise ValueError(f"selection: PlainMamba has no CLS token; only 'global' applies, got {method.selection!r}")
    if getattr(method, "importance_source", "both") != "both":
        raise ValueError("importance_source: PlainMamba sums its four scans before the gate; only 'both' applies, "
                         f"got {method.importance_source!r}")
    if any(name in vars(model) for name in OVERRIDDEN):
        raise RuntimeError("model: the PlainMamba's forward is already overridden")
    state = PlainToPState()
    tokens_fn = functools.partial(pruned_tokens, model, method, state)
    model.forward_tokens = tokens_fn
    model.forward_features = lambda x: model.pool(tokens_fn(x))
    model.forward = lambda x: model.head(model.forward_features(x))

    def undo() -> None:
        for name in OVERRIDDEN:
            vars(model).pop(name, None)

    return ToPViMHandle(model, method, undo, state=state)
