"""How a method object becomes a :class:`~prunelab.common.vlm_plan.VLMPlan`: its own ``vlm_plan()``, the first
seam's ``vlm_select`` (with optional ``vlm_request`` and ``vlm_budget``), or two methods applied together
(:class:`Composed`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prunelab.common.reduction import Reduction
from prunelab.common.vlm_plan import Needs, Stage, VLMPlan

__all__ = ["Composed", "VLMRequest", "plan_of"]


@dataclass(frozen=True)
class VLMRequest:
    """The first seam's request of a ``vlm_select`` method (converted by :func:`plan_of`).

    Attributes:
        vision_layers / received / hidden: vision statistics, as in :class:`Needs`.
        prune_projector: select after the projector.
        llm_layer: also select after this 0-based language-model layer; ``None``: never.
    """

    vision_layers: tuple[int, ...] = ()
    received: bool = False
    hidden: bool = False
    prune_projector: bool = True
    llm_layer: int | None = None


def plan_of(method) -> VLMPlan:
    """``method.vlm_plan()``, or the plan of a ``vlm_select`` method (same select and budget at each stage)."""
    if hasattr(method, "vlm_plan"):
        plan = method.vlm_plan()
        if not isinstance(plan, VLMPlan):
            raise TypeError(f"method: {type(method).__name__}.vlm_plan() must return a VLMPlan, got "
                            f"{type(plan).__name__}")
        return plan
    if not hasattr(method, "vlm_select"):
        raise TypeError(f"method: {type(method).__name__} has no VLM adapter (it needs vlm_plan or vlm_select)")
    req = method.vlm_request() if hasattr(method, "vlm_request") else VLMRequest()
    needs = Needs(tuple(req.vision_layers), req.received, False, req.hidden)
    stages = []
    for where, layer in (("projector", None), ("llm", req.llm_layer)):
        if (where == "projector" and not req.prune_projector) or (where == "llm" and layer is None):
            continue
        budget = (lambda img, _w=where: method.vlm_budget(img, _w)) if hasattr(method, "vlm_budget") else None
        stages.append(Stage(where, method.vlm_select, layer, needs, budget, type(method).__name__))
    if not stages:  # statistics only: a projector stage that keeps everything
        stages.append(Stage("projector", _keep_all, None, needs, None, type(method).__name__))
    return VLMPlan(tuple(stages))


def _keep_all(ctx) -> list:
    return [Reduction(img.token_ids.new_tensor(range(img.embeds.shape[0]))[None], img.embeds.shape[0])
            for img in ctx.images]


@dataclass(frozen=True)
class Composed:
    """Two methods applied together, ``first``'s plan then ``second``'s: ``apply(..., on_existing="compose")``.

    E.g. DivPrune after the projector composed with a random drop after LLM layer 8; at a point where both have a
    stage, ``first`` selects and ``second`` selects among what it kept.
    """

    first: Any
    second: Any

    def vlm_plan(self) -> VLMPlan:
        return plan_of(self.first).then(plan_of(self.second))
