"""RandomPrune: uniformly random visual tokens per image after the projector (the VLM baseline at equal budget)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunelab.common.reduction import Reduction
from prunelab.common.tokens import keep_count
from prunelab.common.validate import check_budget, check_int


@dataclass(frozen=True)
class RandomPrune:
    """Uniformly random visual tokens per image at a budget.

    Attributes:
        budget: a keep ratio (float in (0, 1]) of every visual token of the image (NeXT newlines included, as
            DivPrune counts them), converted by the repo rule ``keep_count``; or a token count (int >= 1) per
            image, which must not exceed the image's tokens.
        seed: base seed. The ``k``-th image of a prompt draws from ``seed + k``: the draw depends on the image's
            place in its own prompt, never on the batch, so a batch keeps what each prompt keeps alone and
            repeated forwards (latency runs, teacher-forced quality) keep the same tokens.
    """

    budget: float | int = 0.111
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "budget", check_budget(self.budget))
        object.__setattr__(self, "seed", check_int(self.seed, "seed"))

    def vlm_plan(self):
        from prunelab.common.vlm_plan import Stage, VLMPlan

        return VLMPlan((Stage("projector", self.vlm_select, budget=self.vlm_budget, name="random"),))

    def vlm_budget(self, image) -> int:
        n = int(image.embeds.shape[0])
        if isinstance(self.budget, int):
            if self.budget > n:
                raise ValueError(f"budget: {self.budget} tokens exceed the {n} visual tokens of the image")
            return self.budget
        return keep_count(n, self.budget, name="budget")

    def vlm_select(self, ctx) -> list[Reduction]:
        keeps, seen = [], {}
        for img in ctx.images:
            k = seen[img.span.sample] = seen.get(img.span.sample, -1) + 1  # k-th image of its prompt
            g = torch.Generator().manual_seed(self.seed + k)
            pick = torch.randperm(img.embeds.shape[0], generator=g)[: img.budget]
            keeps.append(Reduction(pick.sort().values.to(img.embeds.device)[None], img.embeds.shape[0]))
        return keeps
