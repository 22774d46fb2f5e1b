"""DivPrune's method object and its VLM adapter (Ranjbar Alvar et al., CVPR 2025, arXiv 2503.02175).

DivPrune keeps, per image, the ``k`` projected visual tokens that greedily maximise the minimum pairwise
cosine distance (:func:`~prunelab.methods.divprune.selection.max_min_diversity`), right after the multimodal
projector and before language-model layer 0 (the official ``LAYER_INDEX=0`` branch, the only one implemented
there). Text is untouched.

Official repository: ``vbdi/divprune`` (CC BY-NC 4.0), read at commit 799e2d9; no code is copied.
The adapter goes through the VLM seam (:mod:`prunelab.common.vlm`), which reads the image spans from the
placeholder tokens and handles batches, padding and ``generate()``; so the official code's fixed
``SYS_TOKEN_LEN = 35`` offset, its batch-1 indexing and its 3-D ``position_ids`` indexing (official
``prepare_inputs_labels_for_multimodal``, ``LLaVA/llava/model/llava_arch.py``) have no counterpart here.
README.md lists every difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prunelab.common.reduction import Reduction
from prunelab.common.tokens import keep_count
from prunelab.common.validate import check_bool, check_budget, check_choice
from prunelab.kernels.dispatch import IMPLS
from prunelab.methods.divprune.selection import max_min_diversity

__all__ = ["DEFAULT_KEEP_RATIO", "LLAVA15_BUDGETS", "ROUNDINGS", "DivPrune", "divprune_keep_count"]

DEFAULT_KEEP_RATIO = 0.098
"""r, the kept ratio of image tokens (``SUBSET_RATIO`` in the official ``run_Divprune.sh``: ~56 of 576)."""

LLAVA15_BUDGETS = (64, 128, 192)
"""Our standard LLaVA-1.5 budgets, of 576 tokens per image (our choice, not a paper setting)."""

ROUNDINGS = ("half_even", "half_up")


def divprune_keep_count(n: int, ratio: float, rounding: str = "half_even") -> int:
    """k for ``n`` visual tokens at keep ratio ``ratio``: the official rule, ``int(round(r * M))``.

    ``"half_even"`` is Python's ``round`` as in the official ``DivPrune``: 2.5 -> 2, 3.5 -> 4, and no
    tolerance for binary error. It differs from the repo rule :func:`prunelab.common.tokens.keep_count`
    (``"half_up"``: ``floor(r * M + 0.5)``), e.g. ``n=25, r=0.1`` keeps 2 here and 3 there. Both keep at least
    one token: the official code would ask for an empty selection when ``r * M < 0.5``.
    """
    if rounding == "half_up":
        return keep_count(n, ratio, name="budget")
    if rounding != "half_even":
        raise ValueError(f"rounding: expected one of {ROUNDINGS}, got {rounding!r}")
    if n < 1:
        raise ValueError(f"budget: cannot keep a fraction of {n} tokens")
    return max(1, min(n, int(round(n * ratio))))


@dataclass(frozen=True)
class DivPrune:
    """DivPrune's hyperparameters and its VLM adapter.

    Attributes:
        budget: tokens kept per image. A float in (0, 1] is the keep ratio r of that image's visual tokens
            M (default 0.098, the official run script); an int >= 1 is a count (LLaVA-1.5: 64 / 128 / 192 of 576, see
            :meth:`llava15`). On LLaVA-NeXT, M counts the base tile, the unpadded crop tokens and the
            ``image_newline`` tokens (as the official code prunes the packed features).
        rounding: ratio to count: ``"half_even"`` = the official ``int(round(r * M))`` (the default),
            ``"half_up"`` = the repo's ``keep_count``. See :func:`divprune_keep_count`.
        official_quirks: reproduce the official greedy (no masking of chosen tokens, 2nd-smallest first
            pick, distances in the input dtype; ``selection.py``). If it re-picks a token, the kept set would
            hold a duplicate, which the kept-token contract forbids: the adapter then raises.
        impl: ``"auto"``, ``"torch"`` or ``"triton"`` for the selection kernel.
    """

    budget: int | float = DEFAULT_KEEP_RATIO
    rounding: str = "half_even"
    official_quirks: bool = False
    impl: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "budget", check_budget(self.budget))
        check_choice(self.rounding, "rounding", ROUNDINGS)
        object.__setattr__(self, "official_quirks", check_bool(self.official_quirks, "official_quirks"))
        check_choice(self.impl, "impl", IMPLS)

    @classmethod
    def llava15(cls, tokens: int = 64, **kwargs) -> DivPrune:
        """Our LLaVA-1.5 settings: keep ``tokens`` in (64, 128, 192) of the 576 per image (our choice)."""
        if tokens not in LLAVA15_BUDGETS:
            raise ValueError(f"tokens: LLaVA-1.5 budgets are {LLAVA15_BUDGETS}, got {tokens!r}")
        return cls(budget=tokens, **kwargs)

    def keep_for(self, n: int) -> int:
        """k for an image of ``n`` visual tokens; a count above ``n`` raises."""
        if isinstance(self.budget, int):
            if self.budget > n:
                raise ValueError(f"budget: {self.budget} tokens exceed the {n} visual tokens of the image")
            return self.budget
        return divprune_keep_count(n, self.budget, self.rounding)

    # --- VLM seam (prunelab.common.vlm): one stage after the projector, no statistics.

    def vlm_plan(self):
        from prunelab.common.vlm_plan import Stage, VLMPlan

        return VLMPlan((Stage("projector", self.vlm_select, budget=self.vlm_budget, name="DivPrune"),))

    def vlm_budget(self, image) -> int:
        """k for one image: ``M`` is every visual token of its span (NeXT newlines included)."""
        return self.keep_for(int(image.embeds.shape[0]))

    def vlm_select(self, ctx) -> Sequence[Reduction]:
        """Max-min diversity on each image's projected embeddings ``[M, C]``, one image at a time.

        Images differ in M (NeXT, Qwen2.5-VL), so each runs alone; a padded batch with ``valid`` would give
        the same picks but would spend an ``M_max^2`` distance matrix on every image.
        """
        keeps = []
        for i, img in enumerate(ctx.images):
            # the selection is discrete: detach so a forward with autograd on never records the greedy loop
            keep = max_min_diversity(img.embeds.detach()[None], img.budget, official_quirks=self.official_quirks,
                                     impl=self.impl)[0]
            if self.official_quirks and keep.unique().numel() != keep.numel():
                raise ValueError(f"official_quirks: the official greedy picked a token of image {i} twice (exact "
                                 "duplicate embeddings; its loop does not mask chosen tokens); a kept set cannot "
                                 "hold a token twice, so use official_quirks=False for this input")
            keeps.append(Reduction(keep[None], img.embeds.shape[0]))
        return keeps
