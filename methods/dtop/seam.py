"""DToP's seam into a :class:`~prunelab.methods.dtop.segmenter.Segmenter`: the early-exit stage loop.

Installing a method replaces the segmenter's forward (an instance attribute; ``remove()`` deletes it) with
:func:`early_exit_forward`, which after every stage but the last asks the method which active tokens exit
(``method.exits(stage, probs, active)``), freezes their prediction on a canvas, and runs the later blocks on the
remaining tokens only. A batch whose images keep different counts is packed to the longest row and attended
with a key-padding mask (one batched SDPA call per block, no loop over images); the padded rows are never read.

It lives in ``methods/dtop`` until a second segmentation method needs it (then it moves to ``common/``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from prunelab.common.handle import Handle, UnsupportedModelError
from prunelab.common.reduction import Reduction
from prunelab.methods.dtop.heads import HeadOutput, upsample

FREEZE = ("mask_logit", "full_prediction")


@dataclass
class EarlyExitState:
    """What the last forward did, per image (it lives on the handle).

    Attributes:
        exit_stage: [B, N] int64, the stage whose prediction each token keeps (the last stage for survivors).
        tokens_per_block: [B, depth] int64, tokens entering each block.
        tokens_per_head: [B, stages] int64, tokens each head graded.
        token_scores: [B, N, C] the segmentation scores on the token grid, before upsampling (detached).
        history: ``(stage, [kept original positions of each image])`` after each grading.
    """

    exit_stage: torch.Tensor | None = None
    tokens_per_block: torch.Tensor | None = None
    tokens_per_head: torch.Tensor | None = None
    token_scores: torch.Tensor | None = None
    history: list[tuple[str, list[torch.Tensor]]] = field(default_factory=list)

    def macs(self, model) -> torch.Tensor:
        """[B] MACs of each image of the last forward."""
        return torch.tensor([model.macs(nb.tolist(), nh.tolist())
                             for nb, nh in zip(self.tokens_per_block, self.tokens_per_head)], dtype=torch.float64)


class EarlyExitHandle(Handle):
    """A :class:`Handle` that also exposes the last forward's :class:`EarlyExitState`."""

    def __init__(self, model, method, undo, *, state: EarlyExitState):
        super().__init__(model, method, undo)
        self.state = state


def compact(stay: torch.Tensor) -> Reduction:
    """The :class:`Reduction` that keeps the ``stay`` [B, K] slots of each row, ragged rows padded."""
    B, K = stay.shape
    counts = stay.sum(1)
    width = int(counts.max()) if B else 0
    pos = torch.arange(K, device=stay.device).expand(B, K)
    keep = torch.sort(torch.where(stay, pos, pos + K), dim=1).values[:, :width]
    if width == 0 or bool((counts == width).all()):
        return Reduction(keep, K)
    valid = torch.arange(width, device=stay.device) < counts[:, None]
    last = torch.gather(keep, 1, (counts - 1).clamp(min=0)[:, None])
    return Reduction(torch.where(valid, keep, last).clamp(max=max(K - 1, 0)), K, valid)


def _key_mask(valid: torch.Tensor | None) -> torch.Tensor | None:
    """SDPA's boolean mask [B, 1, 1, K] (True: attend) for packed rows; slot 0 stays open so that an image with no
    active token attends to something (its rows are never read) instead of producing NaN."""
    if valid is None:
        return None
    mask = valid.clone()
    mask[:, 0] = True
    return mask[:, None, None, :]


def early_exit_forward(model, method, state: EarlyExitState, images: torch.Tensor, return_heads: bool = False):
    """The segmenter's forward with tokens exiting after each auxiliary head (same returns as the dense one).

    With ``return_heads``, each stage's :class:`HeadOutput` comes too, its ``tokens`` the canvas after that stage
    (every token's latest head output: frozen for the exited, this head's for the active), as the official code
    trains each head on its canvas.
    """
    x = model.embed(images)
    B, N, _ = x.shape
    stages, blocks = model.stages, model.vit.blocks
    S, dev = len(stages), x.device
    ids = torch.arange(N, device=dev).expand(B, N)  # original position of each packed slot
    valid: torch.Tensor | None = None
    canvas = torch.zeros(B, N, model.num_classes, dtype=x.dtype, device=dev)  # head outputs (ATM: mask logits)
    frozen = canvas.clone() if method.freeze == "full_prediction" else None  # whole predictions at exit
    exit_stage = torch.full((B, N), S - 1, dtype=torch.int64, device=dev)
    per_block = torch.zeros(B, len(blocks), dtype=torch.int64)
    per_head = torch.zeros(B, S, dtype=torch.int64)
    history, outs = [], []
    for s, stage in enumerate(stages):
        count = (valid.sum(1) if valid is not None else torch.full((B,), x.shape[1], device=dev)).cpu()
        mask = _key_mask(valid)
        for b in stage:
            per_block[:, b] = count
            if x.shape[1]:
                x = blocks[b](x, attn_mask=mask)
        per_head[:, s] = count
        head = model.heads[s]
        out = head(x, valid)
        if x.shape[1]:
            red = Reduction(ids, N, valid)
            canvas = red.scatter(canvas, out.tokens)
            if frozen is not None:
                frozen = red.scatter(frozen, head.scores(out.tokens, out.image))
        outs.append(HeadOutput(canvas, out.image))
        if s < S - 1:
            with torch.no_grad():
                active = valid if valid is not None else torch.ones(B, x.shape[1], dtype=torch.bool, device=dev)
                leave = method.exits(s, method.probabilities(head, out), active) & active
                rows, slots = leave.nonzero(as_tuple=True)
                exit_stage[rows, ids[rows, slots]] = s
                step = compact(active & ~leave)
            x, ids, valid = step.gather(x), step.gather(ids), step.valid
            history.append((f"stage {s}", [ids[i, :int(c)] for i, c in enumerate(step.counts)]))
    scores = model.heads[-1].scores(canvas, out.image) if frozen is None else frozen
    state.exit_stage, state.tokens_per_block, state.tokens_per_head = exit_stage, per_block, per_head
    state.token_scores = scores.detach()
    state.history[:] = history
    seg = upsample(scores, model.grid, model.img_size)
    return (seg, outs) if return_heads else seg


def install(model: Any, method: Any) -> EarlyExitHandle:
    """Install an early-exit ``method`` (one with ``exits``, ``probabilities`` and ``freeze``) into a segmenter."""
    from prunelab.methods.dtop.segmenter import Segmenter

    if not isinstance(model, Segmenter):
        raise UnsupportedModelError(f"model: {type(model).__name__} is not a prunelab Segmenter")
    if not all(hasattr(method, a) for a in ("exits", "probabilities", "freeze")):
        raise TypeError(f"method: {type(method).__name__} has no segmenter adapter (it needs exits, probabilities "
                        "and freeze)")
    if "forward" in vars(model):
        raise RuntimeError("model: the segmenter's forward is already overridden")
    state = EarlyExitState()
    model.forward = functools.partial(early_exit_forward, model, method, state)
    return EarlyExitHandle(model, method, functools.partial(delattr, model, "forward"), state=state)
