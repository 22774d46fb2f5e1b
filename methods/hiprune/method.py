"""HiPrune (Liu et al., arXiv 2508.00553): training-free visual token pruning from hierarchical attention.

The method object holds the paper's hyperparameters and implements the VLM seam (:mod:`prunelab.common.vlm`):
it asks for the attention received at its two encoder blocks, maps it onto each image's token grid
(``vlm.py``) and keeps ``hiprune_select``'s tokens of the projected features, before LLM layer 0.
Official code: ``Danielement321/HiPrune`` (MIT), compared at commit 6e83a12; see README.md for what differs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType

import torch

from prunelab.common.reduction import Reduction
from prunelab.common.tokens import keep_count
from prunelab.common.validate import check_bool, check_budget, check_choice, check_int, check_real
from prunelab.methods.hiprune.selection import (
    DEFAULT_ANCHOR_RATIO,
    HiPrunePartition,
    hiprune_partition,
    hiprune_select,
)
from prunelab.methods.hiprune.vlm import image_regions, split_budget

FAMILY_ENCODER = MappingProxyType({"llava": "clip", "llava_next": "clip", "qwen2_5_vl": "qwen2_5_vl"})
"""The vision-encoder family of each VLM family the seam supports."""

ENCODER_BLOCKS = MappingProxyType({
    # 0-based block indices (object layer, deep layer); negative counts from the end. Official README.
    "clip": (8, -2),  # LLaVA-1.5 / LLaVA-NeXT: layer 9 (1-based); the penultimate layer = LLaVA's feature layer
    "qwen2_5_vl": (15, -1),  # Qwen2.5-VL: layer 16 (1-based, a full-attention block); the last block
})
"""Default (object_block, deep_block) per vision-encoder family."""

PAPER_BUDGETS = MappingProxyType({
    "llava-1.5": (192, 128, 64),  # of 576 (official README, HIPRUNE_RETENTION)
    "llava-next": (640, 320, 160),  # of 2880, split over the crops (official README)
    "qwen2_5_vl": (0.334, 0.223, 0.112),  # keep ratios (official README, HIPRUNE_QWEN_RETENTION)
})
"""The budgets the paper evaluates, per model."""


@dataclass(frozen=True)
class HiPrune:
    """HiPrune's hyperparameters; defaults are the paper's LLaVA-1.5 setting (official README, hyperparameters).

    Attributes:
        budget: N', image tokens kept per image. An int is a count (official README: 192 / 128 / 64 of 576
            on LLaVA-1.5); a float in (0, 1] is a keep ratio of the image's tokens (official README:
            Qwen2.5-VL 0.334 / 0.223 / 0.112), converted by ``keep_count`` (round half up) or, with
            ``official_quirks``, by Python's ``round`` like the official ``qwen2_5_vl_HiPrune.py``.
        anchor_ratio: alpha, the budget share of anchors and their buffers; anchors = round(N' * alpha / 5)
            (official ``encode_images``; 0.1 for every model, official README). 0 gives the registers-only ablation.
        encoder: vision-encoder family, which picks the default blocks: ``"clip"`` (LLaVA-1.5, LLaVA-NeXT)
            or ``"qwen2_5_vl"`` (official README).
        object_block: 0-based encoder block whose attention picks anchors ("object-centric middle
            layer"); None = the family default: CLIP 8 (the paper's layer 9), Qwen2.5-VL 15 (layer 16).
        deep_block: 0-based block whose attention picks registers; negatives count from the end. None =
            the family default: CLIP -2 (LLaVA's feature layer), Qwen2.5-VL -1 (the last block).
        official_quirks: reproduce the official code's anchor and budget rounding and its flat-index
            neighbours (wrap across rows, clamp at the top and bottom; official ``encode_images``). README.md
            lists each.
        keep_newlines: LLaVA-NeXT only. N' counts patch tokens (base tile + unpadded crops); the
            ``image_newline`` tokens are dropped (False, like the official "spatial" merge, which has none;
            official ``llava_arch.py``) or all kept on top of N' (True, so N' = all patches reproduces the dense model).
    """

    budget: int | float = 192
    anchor_ratio: float = DEFAULT_ANCHOR_RATIO
    encoder: str = "clip"
    object_block: int | None = None
    deep_block: int | None = None
    official_quirks: bool = False
    keep_newlines: bool = False

    def __post_init__(self):
        object.__setattr__(self, "budget", check_budget(self.budget))
        put = functools.partial(object.__setattr__, self)
        put("anchor_ratio", check_real(self.anchor_ratio, "anchor_ratio", low=0.0, high=1.0))
        check_choice(self.encoder, "encoder", sorted(ENCODER_BLOCKS))
        for name in ("object_block", "deep_block"):
            if getattr(self, name) is not None:
                put(name, check_int(getattr(self, name), name))
        for name in ("official_quirks", "keep_newlines"):
            put(name, check_bool(getattr(self, name), name))

    @classmethod
    def for_model(cls, model, **kwargs) -> HiPrune:
        """HiPrune for a transformers LLaVA-1.5 / LLaVA-NeXT / Qwen2.5-VL ``model``, blocks made 0-based.

        The seam resolves negative blocks by itself; ``for_model`` also checks the blocks against the encoder's
        depth before any forward, makes CLIP's deep block follow the model's ``vision_feature_layer`` (the
        official code's "LLaVA feature layer": ``hidden_states[l]`` is the output of block ``l - 1``; the default -2
        is the same block unless a model picks another feature layer), and requires Qwen2.5-VL blocks to be
        full-attention blocks: at window blocks the received attention is local.
        """
        from prunelab.common.vlm_layout import require_family
        from prunelab.common.vlm_vision import vision_layers

        family = require_family(model)
        encoder = kwargs.pop("encoder", FAMILY_ENCODER[family])
        if encoder != FAMILY_ENCODER[family]:
            raise ValueError(f"encoder: {encoder!r} does not match the model ({family} uses "
                             f"{FAMILY_ENCODER[family]!r})")
        depth = len(vision_layers(model, family))
        method = cls(encoder=encoder, **kwargs)
        obj, deep = method.blocks
        layer = getattr(model.config, "vision_feature_layer", None)
        if method.deep_block is None and encoder == "clip" and isinstance(layer, int):
            deep = layer % (depth + 1) - 1
        resolved = {}
        for name, b in (("object_block", obj), ("deep_block", deep)):
            if not -depth <= b < depth:
                raise ValueError(f"{name}: block {b} outside the vision encoder's {depth} blocks")
            resolved[name] = b % depth
            full = getattr(model.config.vision_config, "fullatt_block_indexes", None)
            if family == "qwen2_5_vl" and full is not None and resolved[name] not in full:
                raise ValueError(f"{name}: block {resolved[name]} of Qwen2.5-VL's vision encoder uses window "
                                 f"attention, so its received attention is local; use one of {list(full)}")
        return replace(method, **resolved)

    @property
    def blocks(self) -> tuple[int, int]:
        """(object_block, deep_block), 0-based, with the encoder family's defaults filled in."""
        obj, deep = ENCODER_BLOCKS[self.encoder]
        return (obj if self.object_block is None else self.object_block,
                deep if self.deep_block is None else self.deep_block)

    def budget_for(self, n: int) -> int:
        """N' for an image of ``n`` tokens; a count above ``n`` raises."""
        if isinstance(self.budget, int):
            if self.budget > n:
                raise ValueError(f"budget {self.budget} exceeds the {n} tokens of the image")
            return self.budget
        if self.official_quirks:
            k = round(n * self.budget)  # Qwen code: round(n_image_tokens * RETAIN), half to even
            if not 1 <= k <= n:
                raise ValueError(f"budget ratio {self.budget} of {n} tokens rounds to {k} (official rounding)")
            return k
        return keep_count(n, self.budget, name="budget")

    def partition(self, mid_scores: torch.Tensor, deep_scores: torch.Tensor, grid: tuple[int, int],
                  valid: torch.Tensor | None = None) -> HiPrunePartition:
        """Anchors, buffers and registers for [B, N] scores of the object and deep blocks.

        With a keep-ratio budget and a ``valid`` mask, the ratio applies to the valid tokens, which must
        then number the same in every row (one N' per call).
        """
        n = mid_scores.shape[-1]
        if valid is not None and isinstance(self.budget, float) and valid.dim() == 2 and valid.shape[0]:
            counts = valid.sum(dim=1)
            if bool((counts != counts[0]).any()):
                raise ValueError("valid: a keep-ratio budget needs the same number of valid tokens in every row")
            n = int(counts[0])
        return hiprune_partition(mid_scores, deep_scores, grid, self.budget_for(n), anchor_ratio=self.anchor_ratio,
                                 official_quirks=self.official_quirks, valid=valid)

    def select(self, mid_scores: torch.Tensor, deep_scores: torch.Tensor, grid: tuple[int, int],
               valid: torch.Tensor | None = None) -> torch.Tensor:
        """Kept indices [B, N'] (int64, sorted, unique) for [B, N] object- and deep-block scores."""
        return self.partition(mid_scores, deep_scores, grid, valid).keep

    # --- VLM seam (prunelab.common.vlm) ---

    def vlm_plan(self):
        """One stage after the projector, reading the received attention at the object and deep blocks."""
        from prunelab.common.vlm_plan import Needs, Stage, VLMPlan

        # Negative blocks count from the end; the seam resolves them against the encoder's depth and reports the
        # statistics under these same keys, so the defaults work without for_model.
        needs = Needs(vision_layers=tuple(sorted(set(self.blocks))), received=True)
        return VLMPlan((Stage("projector", self.vlm_select, needs=needs, budget=self.vlm_budget, name="HiPrune"),))

    def _patch_budget(self, span) -> int:
        """N' of one image: its patch tokens (NeXT newlines excluded) give the count a ratio applies to."""
        newlines = 0 if span.newline is None else int(span.newline.sum())
        return self.budget_for(span.num_tokens - newlines)

    def vlm_budget(self, image) -> int:
        """Tokens the seam keeps for ``image``: N', plus the NeXT newlines when ``keep_newlines``."""
        span = image.span
        extra = int(span.newline.sum()) if self.keep_newlines and span.newline is not None else 0
        return self._patch_budget(span) + extra

    def vlm_select(self, ctx) -> Sequence[Reduction]:
        """Per image: HiPrune on each region of its grid (NeXT: base tile, then the unpadded crops)."""
        if FAMILY_ENCODER.get(ctx.family) != self.encoder:
            raise ValueError(f"encoder: {self.encoder!r} does not match the model family {ctx.family!r}; use "
                             "HiPrune.for_model(model, ...)")
        keeps = []
        for img in ctx.images:
            regions = image_regions(ctx.family, img.span, img.received, self.blocks)
            tiles = next(iter(img.received.values())).shape[0] if ctx.family == "llava_next" else 1
            budgets = split_budget(self._patch_budget(img.span), [r.index.numel() for r in regions], tiles)
            parts = [r.index[hiprune_select(r.mid[None], r.deep[None], r.grid, b, anchor_ratio=self.anchor_ratio,
                                            official_quirks=self.official_quirks)[0]]
                     for r, b in zip(regions, budgets) if b > 0]
            if self.keep_newlines and img.span.newline is not None:
                parts.append(img.span.newline.to(img.token_ids.device).nonzero().flatten())
            keeps.append(Reduction(torch.cat(parts).sort().values[None], img.embeds.shape[0]))
        return keeps
