"""Removing chosen image tokens, per prompt: the probe that shows the test-bed reads the region it is asked about.

:class:`DropTokens` is a VLM stage plan, not a method: after the projector it removes, from the ``i``-th prompt's
image, the token indices ``drop[i]`` and keeps the rest (in order), exactly as a pruning method's selection is
applied. With the cells a question's answer depends on (``Sample.cells``) it removes the region asked about; with
as many tokens drawn uniformly from the whole image it is the control at the same budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prunelab.common.reduction import Reduction

__all__ = ["DropTokens", "cell_tokens", "control_tokens"]


@dataclass(frozen=True)
class DropTokens:
    """Remove ``drop[i]`` (image token indices) from the image of prompt ``i`` of the batch (one image a prompt)."""

    drop: tuple[tuple[int, ...], ...]

    def vlm_plan(self):
        from prunelab.common.vlm_plan import Stage, VLMPlan

        return VLMPlan((Stage("projector", self.vlm_select, budget=self.vlm_budget, name="drop_tokens"),))

    def _drop(self, image) -> set[int]:
        b = image.span.sample
        if b >= len(self.drop):
            raise ValueError(f"drop: {len(self.drop)} entries for a batch with prompt {b}")
        return set(self.drop[b])

    def vlm_budget(self, image) -> int:
        n = int(image.embeds.shape[0])
        drop = self._drop(image)
        if not drop <= set(range(n)) or len(drop) >= n:
            raise ValueError(f"drop: prompt {image.span.sample} must drop 0..{n - 1} token indices, fewer than {n}")
        return n - len(drop)

    def vlm_select(self, ctx) -> list[Reduction]:
        out = []
        for img in ctx.images:
            n, drop = int(img.embeds.shape[0]), self._drop(img)
            keep = torch.tensor([i for i in range(n) if i not in drop], device=img.embeds.device)
            out.append(Reduction(keep[None], n))
        return out


def cell_tokens(cells: Sequence[int], token_cells: torch.Tensor) -> tuple[int, ...]:
    """The image token indices lying in ``cells`` (``token_cells[t]``: the cell of token ``t``)."""
    return tuple(int(t) for t in torch.nonzero(torch.isin(token_cells, torch.tensor(list(cells)))).flatten())


def control_tokens(count: int, n: int, generator: torch.Generator) -> tuple[int, ...]:
    """``count`` of the ``n`` image token indices, uniformly at random (the control: random removal, same budget)."""
    return tuple(sorted(int(i) for i in torch.randperm(n, generator=generator)[:count]))
