"""RandomPrune: uniformly random visual tokens per image after the projector (the VLM baseline at equal budget), or
after a language-model layer (a late drop to compose with another method)."""

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
            DivPrune counts them; with ``layer``, of the image's tokens still in the prompt there), converted by the
            repo rule ``keep_count``; or a token count (int >= 1) per image, which must not exceed those tokens.
        seed: base seed. The ``k``-th image of a prompt draws from ``seed + k``: the draw depends on the image's
            place in its own prompt, never on the batch, so a batch keeps what each prompt keeps alone and
            repeated forwards (latency runs, teacher-forced quality) keep the same tokens.
        layer: ``None`` (default): the drop happens after the projector, before the language model. An int ``K``:
            after language-model layer ``K`` (0-based), among the image tokens still in the prompt there, so layers
            ``0 .. K`` see every token and the later ones the kept share: the late drop that ``apply(...,
            on_existing="compose")`` adds to a method pruning earlier (e.g. DivPrune, then half of what it kept after
            layer 1). ``K`` must leave a layer after it (the engine names ``layer`` otherwise).
    """

    budget: float | int = 0.111
    seed: int = 0
    layer: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "budget", check_budget(self.budget))
        object.__setattr__(self, "seed", check_int(self.seed, "seed"))
        if self.layer is not None:
            object.__setattr__(self, "layer", check_int(self.layer, "layer", low=0))

    def vlm_plan(self):
        from prunelab.common.vlm_plan import Stage, VLMPlan

        if self.layer is None:
            return VLMPlan((Stage("projector", self.vlm_select, budget=self.vlm_budget, name="random"),))
        return VLMPlan((Stage("llm", self.vlm_select, layer=self.layer, budget=self.vlm_budget,
                              name=f"random after LLM layer {self.layer}"),))

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
