"""CATP's method object and its VLM plan (Li et al., "CATP: Contextually Adaptive Token Pruning for Efficient and
Enhanced Multimodal In-Context Learning", AAAI 2026, arXiv 2508.07871).

A multimodal in-context prompt holds ``n`` demonstrations (image, question, answer) and the query (image, question).
CATP removes a share ``R`` of all image tokens in two stages of ``R / 2`` each (Sec. "Method"):

1. after the projector, per image: ``floor(S_i (1 - R/2))`` tokens by greedy facility location plus alignment with
   the image's paired text (``selection.facility_location``);
2. in the language model: after layer ``K`` the context images of all demonstrations, ranked jointly by the clipped
   attention increase from layer ``K - 1`` to ``K`` of the query's last token plus ``lambda_2`` times the similarity
   to the query sample's mean hidden state, keep ``floor((1 - R) sum_i S_i)`` between them; after layer ``K + 1``
   the query image keeps ``floor((1 - R) S_q)`` by similarity to the mean of the pruned context.

The plan has one projector stage and two LLM stages on the stage engine (``prunelab.common.vlm``); the engine reads
the image spans of every sample (any number of images per prompt, batches, padding, ``generate()``), and computes the
last token's attention rows at layers ``K - 1`` and ``K`` beside SDPA (``Needs.previous``). In each prompt the last
image is the query image and the images before it are the context. There is no official code (none was found); the
README lists what the paper leaves open and the choice made for each, every one a field here.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import MappingProxyType

import torch

from prunelab.common.reduction import Reduction
from prunelab.common.tokens import topk_sorted
from prunelab.common.validate import check_choice, check_int, check_real
from prunelab.methods.catp import selection

__all__ = ["CATP", "LAYERS", "PAPER_RATIOS", "context_total", "query_count", "stage1_count"]

PAPER_RATIOS = (0.667, 0.778, 0.899)
"""R, the shares of image tokens removed in the paper's tables (77.8 % is its headline setting)."""

LAYERS = MappingProxyType({32: 6, 40: 10})
"""K by the language model's depth: 6 for the 7B/8B models (LLaVA-NeXT-7B, InternVL2.5-8B, Qwen2.5-VL-7B, 28-32
layers), 10 for LLaVA-NeXT-13B (40 layers)."""

NEXT_TOKENS = ("base", "anyres")
CONTEXT_MEANS = ("all", "images")
POSITIONS = ("keep", "compact")
_EPS = 1e-6  # the counts' floor tolerates binary error: floor(576 * (1 - 0.667 / 2)) is 384, not 383


def stage1_count(n: int, ratio: float) -> int:
    """Stage 1's tokens of an image of ``n``: ``floor(n (1 - R/2))``, at least 1."""
    return max(1, min(n, math.floor(n * (1 - ratio / 2) + _EPS)))


def context_total(counts, ratio: float) -> int:
    """The context images' tokens after layer K, all demonstrations together: ``floor((1 - R) sum_i S_i)`` of their
    token counts ``S_i`` before stage 1."""
    return math.floor((1 - ratio) * sum(counts) + _EPS)


def query_count(n: int, ratio: float) -> int:
    """The query image's tokens after layer K + 1: ``floor((1 - R) S_q)``, at least 1."""
    return max(1, min(n, math.floor((1 - ratio) * n + _EPS)))


@dataclass(frozen=True)
class CATP:
    """CATP's hyperparameters and its VLM plan; :meth:`for_model` sets ``layer`` from the model's depth.

    Attributes:
        ratio: R, the share of all image tokens removed, in [0, 1); each stage removes ``R / 2`` of them (paper:
            66.7, 77.8, 89.9 %; default 77.8 %). 0 keeps every token.
        layer: K, the 0-based language-model layer after which the context images are pruned; the attention
            increase reads layers ``K - 1`` and ``K`` (paper: K = 6, 10 for the 13B model). ``None``: by depth.
        query_layer: the layer after which the query image is pruned; ``None``: ``K + 1`` (the paper's). It may
            equal ``K`` (language models too shallow for ``K + 1``: the test models); the query stage then runs
            after the context stage, on what it kept.
        lambda_1: stage 1's text-alignment weight (paper: 0.7).
        lambda_2: stage 2's weight of the similarity to the query (paper: 0.6).
        next_tokens: LLaVA-NeXT's image tokens: ``"base"``, the base (global) tile's tokens only, the paper's "576
            tokens per image" (the crops and newlines are dropped before stage 1 and are not counted in ``R``);
            ``"anyres"``: the whole packed span (base tile, crops, newlines) is the image's ``S_i``. Other families
            have one tile: both are the same.
        context_mean: the mean the query image is compared with after layer ``K + 1``: ``"all"``, every row before
            the query image (pruned context images, demonstration text, system prompt), or ``"images"``, the pruned
            context images' tokens only. The paper says "the pruned context"; ``"all"`` is our default.
        llm_positions: positions after the LLM stages: ``"keep"`` (kept tokens keep their positions; default) or
            ``"compact"`` (renumbered contiguously, decoding continues right after them; 1-D RoPE only).
        family: the model family (set by :meth:`for_model`); the base-tile stage runs on LLaVA-NeXT only (``None``:
            on every family, where it keeps every token of a one-tile image).
    """

    ratio: float = 0.778
    layer: int | None = None
    query_layer: int | None = None
    lambda_1: float = 0.7
    lambda_2: float = 0.6
    next_tokens: str = "base"
    context_mean: str = "all"
    llm_positions: str = "keep"
    family: str | None = None

    def __post_init__(self):
        put = functools.partial(object.__setattr__, self)
        put("ratio", check_real(self.ratio, "ratio", low=0.0, high=1.0, high_open=True))
        for name in ("lambda_1", "lambda_2"):
            put(name, check_real(getattr(self, name), name, low=0.0))
        if self.layer is not None:
            put("layer", check_int(self.layer, "layer", low=1))
        if self.query_layer is not None:
            put("query_layer", check_int(self.query_layer, "query_layer", low=1))
            if self.layer is not None and self.query_layer < self.layer:
                raise ValueError(f"query_layer: the query image is pruned after the context, at layer {self.layer} "
                                 f"or later; got {self.query_layer}")
        check_choice(self.next_tokens, "next_tokens", NEXT_TOKENS)
        check_choice(self.context_mean, "context_mean", CONTEXT_MEANS)
        check_choice(self.llm_positions, "llm_positions", POSITIONS)

    @classmethod
    def for_model(cls, model, **kwargs) -> CATP:
        """CATP for a transformers LLaVA-1.5 / LLaVA-NeXT / Qwen2.5-VL ``model``: ``layer`` from its depth (6, or 10
        from 40 layers on) unless given, both stage layers checked against the language model."""
        from prunelab.common.vlm_layout import require_family

        family = require_family(model)
        depth = model.config.get_text_config().num_hidden_layers
        method = cls(**kwargs)
        layer = method.layer if method.layer is not None else (LAYERS[40] if depth >= 40 else LAYERS[32])
        query = method.query_layer if method.query_layer is not None else layer + 1
        if query > depth - 2:
            raise ValueError(f"layer: the query image is pruned after layer {query}, which must lie in [1, "
                             f"{depth - 2}] for a language model of {depth} layers (a later layer must exist); set "
                             "layer (and query_layer) for this model")
        if method.llm_positions == "compact" and family == "qwen2_5_vl":
            raise ValueError("llm_positions: Qwen2.5-VL's M-RoPE ids are kept after a drop; use 'keep'")
        return cls(**{**kwargs, "layer": layer, "query_layer": query, "family": family})

    # -- the plan ----------------------------------------------------------------------------------------------
    def vlm_plan(self):
        from prunelab.common.vlm_plan import Needs, Stage, VLMPlan

        if self.layer is None:
            raise ValueError("layer: CATP prunes after a language-model layer K; give layer or build it with "
                             "CATP.for_model(model)")
        query_layer = self.query_layer if self.query_layer is not None else self.layer + 1
        renumber = self.llm_positions == "compact"
        stages = []
        if self.next_tokens == "base" and self.family in (None, "llava_next"):
            stages.append(Stage("projector", self._base_tile, budget=lambda img: img.span.base_tokens,
                                name="CATP base tile"))
        stages += [
            Stage("projector", self._stage1, budget=self._stage1_budget, name="CATP stage 1"),
            Stage("llm", self._context, layer=self.layer, needs=Needs(rows=("last",), previous=True), exact=False,
                  renumber=renumber, name="CATP stage 2, context"),
            Stage("llm", self._query, layer=query_layer, exact=False, renumber=renumber,
                  name="CATP stage 2, query"),
        ]
        return VLMPlan(tuple(stages))

    def _tokens(self, span) -> int:
        """S_i: the image's tokens before stage 1 (NeXT with ``next_tokens="base"``: its base tile)."""
        return span.base_tokens if self.next_tokens == "base" else span.num_tokens

    @staticmethod
    def _base_tile(ctx) -> list[Reduction]:
        return [Reduction(torch.arange(img.span.base_tokens, device=img.embeds.device)[None], img.embeds.shape[0])
                for img in ctx.images]

    # -- stage 1 -----------------------------------------------------------------------------------------------
    def _stage1_budget(self, img) -> int:
        return stage1_count(img.embeds.shape[0], self.ratio)

    def _stage1(self, ctx) -> list[Reduction]:
        """Per image the greedy selection; images of equal size, budget and text presence run as one batch."""
        out: list[Reduction | None] = [None] * len(ctx.images)
        groups: dict[tuple, list[tuple[int, torch.Tensor | None]]] = {}
        for i, (img, text) in enumerate(zip(ctx.images, _paired_text(ctx))):
            n = img.embeds.shape[0]
            if img.budget >= n:
                out[i] = Reduction.keep_all(1, n, img.embeds.device)
                continue
            mean = ctx.hidden[img.span.sample, text].mean(0).detach() if text.numel() else None
            groups.setdefault((n, img.budget, mean is None), []).append((i, mean))
        for (n, k, no_text), members in groups.items():
            x = torch.stack([ctx.images[i].embeds.detach() for i, _ in members])
            text = None if no_text else torch.stack([m for _, m in members])
            keep, _ = selection.facility_location(x, text, k, self.lambda_1)
            for (i, _), row in zip(members, keep):
                out[i] = Reduction(row[None], n)
        return out

    # -- stage 2 -----------------------------------------------------------------------------------------------
    def _context(self, ctx) -> list[Reduction]:
        """After layer K: the context images of each prompt ranked jointly; the query image keeps its tokens."""
        out = [Reduction.keep_all(1, img.embeds.shape[0], img.embeds.device) for img in ctx.images]
        for b, (query, context) in _by_prompt(ctx).items():
            if not context:
                continue
            rows = ctx.positions[b] >= ctx.images[query].span.positions[0]
            query_mean = ctx.hidden[b, rows].mean(0).detach()
            scores = [selection.context_scores(img.rows["last"][:, 0].mean(0), img.previous_rows["last"][:, 0].mean(0),
                                               img.embeds.detach(), query_mean, self.lambda_2)
                      for img in (ctx.images[i] for i in context)]
            sizes = [s.numel() for s in scores]
            total = context_total([self._tokens(ctx.images[i].span) for i in context], self.ratio)
            total = min(sum(sizes), max(len(context), total))
            for i, keep in zip(context, _joint_top_k(scores, total)):
                out[i] = Reduction(keep[None], sizes[context.index(i)])
        return out

    def _query(self, ctx) -> list[Reduction]:
        """After layer K + 1: the query image of each prompt by similarity to the pruned context's mean."""
        out = [Reduction.keep_all(1, img.embeds.shape[0], img.embeds.device) for img in ctx.images]
        for b, (query, context) in _by_prompt(ctx).items():
            img = ctx.images[query]
            k = min(img.embeds.shape[0], query_count(self._tokens(img.span), self.ratio))
            if k >= img.embeds.shape[0]:
                continue
            pos, start = ctx.positions[b], img.span.positions[0]
            if self.context_mean == "images" and context:
                rows = torch.isin(pos, torch.cat([ctx.images[i].span.positions for i in context]))
            else:
                rows = (pos >= 0) & (pos < start)
            if not bool(rows.any()):  # nothing before the query image: its own prompt's rows
                rows = pos >= start
            scores = selection.query_scores(img.embeds.detach(), ctx.hidden[b, rows].mean(0).detach())
            out[query] = Reduction(topk_sorted(scores, k)[None], img.embeds.shape[0])
        return out


def _by_prompt(ctx) -> dict[int, tuple[int, list[int]]]:
    """Per sample: (the query image's index in ``ctx.images``, the context images' indices in prompt order)."""
    groups: dict[int, list[int]] = {}
    for i, img in enumerate(ctx.images):
        groups.setdefault(img.span.sample, []).append(i)
    out = {}
    for b, members in groups.items():
        members.sort(key=lambda i: int(ctx.images[i].span.positions[0]))
        out[b] = (members[-1], members[:-1])
    return out


def _paired_text(ctx) -> list[torch.Tensor]:
    """Per image, the prompt rows of its paired text: the valid rows after its span, up to the next image of its
    prompt (the last image: to the end of the prompt)."""
    out = [None] * len(ctx.images)
    for b, (query, context) in _by_prompt(ctx).items():
        order = [*context, query]
        for j, i in enumerate(order):
            end = int(ctx.images[order[j + 1]].span.positions[0]) if j + 1 < len(order) else ctx.hidden.shape[1]
            start = int(ctx.images[i].span.positions[-1]) + 1
            rows = torch.arange(start, end, device=ctx.hidden.device)
            out[i] = rows[ctx.positions[b, start:end] >= 0]
    return out


def _joint_top_k(scores: list[torch.Tensor], total: int) -> list[torch.Tensor]:
    """The ``total`` highest of all images' ``scores`` jointly (ties to the earlier image, then the lower index),
    every image keeping at least its best token; per image, the kept indices sorted."""
    flat = torch.cat(scores)
    sizes = torch.tensor([s.numel() for s in scores], device=flat.device)
    owner = torch.repeat_interleave(torch.arange(len(scores), device=flat.device), sizes)
    order = torch.sort(-flat, stable=True).indices
    kept = torch.zeros_like(flat, dtype=torch.bool)
    kept[order[:total]] = True
    starts = [0, *sizes.cumsum(0).tolist()]
    for j, s in enumerate(scores):  # an image left with nothing takes its best token from the lowest kept elsewhere
        if not bool(kept[starts[j]:starts[j + 1]].any()):
            rank = kept[order] & (torch.bincount(owner[kept], minlength=len(scores))[owner[order]] > 1)
            kept[order[rank.nonzero()[-1]]] = False
            kept[starts[j] + int(s.argmax())] = True  # argmax: the first of equal maxima
    return [kept[starts[j]:starts[j + 1]].nonzero().flatten() for j in range(len(scores))]
