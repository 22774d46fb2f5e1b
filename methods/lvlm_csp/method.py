"""LVLM_CSP's method object and its VLM plan (Chen et al., "LVLM_CSP: Accelerating Large Vision Language Models via
Clustering, Scattering, and Pruning for Reasoning Segmentation", arXiv 2504.10854).

Three stages over the language model's ``L`` layers (the paper's abstract and method overview):

1. **clustering**: ``N_c`` representatives of each image's ``N`` tokens run through layers ``0 .. L1 - 1``
   (coarse-grained reasoning); the other tokens wait outside those layers;
2. **scattering**: every token is re-activated at layer ``L1``; a non-representative re-enters with a value built
   from its input embedding and its cluster's representative (``scatter_mode``), and layers ``L1 .. L2 - 1`` see all
   ``N`` (fine-grained reasoning);
3. **pruning**: before layer ``L2`` the image keeps the ``N_keep`` tokens the ``[SEG]`` token attends to most.

On the stage engine (``prunelab.common.vlm``): an LLM stage before layer 0 (``layer=-1``, its dropped tokens stay in
the prompt), a reactivating stage after layer ``L1 - 1``, and a stage after layer ``L2 - 1`` that reads the ``[SEG]``
rows beside SDPA. The average image tokens per layer is ``(L1 N_c + (L2 - L1) N + (L - L2) N_keep) / L``
(:func:`mean_image_tokens`). There is no official code; the README lists what the paper leaves open and our choice
for each, every one a field here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from prunelab.common.reduction import Reduction
from prunelab.common.tokens import keep_count, topk_sorted
from prunelab.common.validate import check_choice, check_int
from prunelab.methods.lvlm_csp import selection

__all__ = ["SELECTORS", "LVLMCSP", "mean_image_tokens"]

SELECTORS = ("uniform", "random", "cls", "seg_first")


def mean_image_tokens(n: int, clusters: int, keep: int, scatter_layer: int, prune_layer: int, layers: int) -> float:
    """The image tokens per language-model layer, averaged over the ``layers`` layers:
    ``(L1 N_c + (L2 - L1) N + (L - L2) N_keep) / L``."""
    return (scatter_layer * clusters + (prune_layer - scatter_layer) * n + (layers - prune_layer) * keep) / layers


def _count(value, n: int, name: str) -> int:
    if isinstance(value, float):
        return keep_count(n, value, name=name)
    if value > n:
        raise ValueError(f"{name}: {value} tokens exceed the {n} visual tokens of the image")
    return value


def _check_amount(value, name: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a token count >= 1 or a share in (0, 1], got {value!r}")
    if isinstance(value, float) and not 0.0 < value <= 1.0 or isinstance(value, int) and value < 1:
        raise ValueError(f"{name}: expected a token count >= 1 or a share in (0, 1], got {value!r}")
    return value


@dataclass(frozen=True)
class LVLMCSP:
    """LVLM_CSP's settings and its VLM plan; :meth:`for_model` checks them against the model.

    Attributes:
        clusters: N_c, the representatives per image in layers ``0 .. L1 - 1``: a count, or a share of the image's
            tokens in (0, 1].
        keep: N_keep, the tokens per image from layer ``L2`` on: a count or a share.
        scatter_layer: L1, the first layer that sees every token again (>= 1).
        prune_layer: L2, the first layer after the pruning (> L1); the ``[SEG]`` rows are read at layer ``L2 - 1``.
        selector: how the representatives are chosen: ``"uniform"``, ``"random"``, ``"cls"`` (the vision encoder's
            CLS row at the layer LLaVA reads; one-tile CLIP towers, LLaVA-1.5 and LISA) or ``"seg_first"`` (instance
            masks from ``instances``).
        scatter_mode: the value a non-representative re-enters with at L1 (``selection.scatter``).
        seg_token_id: the ``[SEG]`` token's id; its attention rows score the pruning (several ``[SEG]`` tokens: their
            rows averaged). ``None``: the prompt's last token stands in (a model that emits ``[SEG]`` next).
        instances: for ``"seg_first"``: ``instances(image) -> bool [O, N]`` masks over the image's ``N`` tokens (its
            argument is the :class:`~prunelab.common.vlm_plan.ImageContext`, whose ``span`` names the image).
        seed: the ``"random"`` selector's seed; the ``k``-th image of a prompt draws from ``seed + k``.
        feature_layer: the encoder layer of the CLS row (set by :meth:`for_model`).
    """

    clusters: int | float = 32
    keep: int | float = 32
    scatter_layer: int = 8
    prune_layer: int = 16
    selector: str = "uniform"
    scatter_mode: str = "add_rep_delta"
    seg_token_id: int | None = None
    instances: Callable | None = None
    seed: int = 0
    feature_layer: int | None = None
    _scratch: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        put = functools.partial(object.__setattr__, self)
        put("clusters", _check_amount(self.clusters, "clusters"))
        put("keep", _check_amount(self.keep, "keep"))
        put("scatter_layer", check_int(self.scatter_layer, "scatter_layer", low=1))
        put("prune_layer", check_int(self.prune_layer, "prune_layer", low=self.scatter_layer + 1))
        check_choice(self.selector, "selector", SELECTORS)
        check_choice(self.scatter_mode, "scatter_mode", selection.SCATTER_MODES)
        if self.seg_token_id is not None:
            put("seg_token_id", check_int(self.seg_token_id, "seg_token_id", low=0))
        put("seed", check_int(self.seed, "seed"))
        if self.selector == "seg_first" and not callable(self.instances):
            raise ValueError("instances: the 'seg_first' selector needs instances(image) -> bool [O, N] masks")

    @classmethod
    def for_model(cls, model, **kwargs) -> LVLMCSP:
        """LVLM_CSP for a transformers LLaVA-1.5 / LLaVA-NeXT / Qwen2.5-VL ``model`` (or a LISA-style model's VLM):
        the layers checked against its language model, the CLS row's encoder layer for ``selector="cls"``."""
        from prunelab.common.vlm_layout import adapter, require_family

        family = require_family(model)
        method = cls(**kwargs)
        depth = model.config.get_text_config().num_hidden_layers
        if method.prune_layer > depth - 1:
            raise ValueError(f"prune_layer: {method.prune_layer} must lie in [{method.scatter_layer + 1}, {depth - 1}] "
                             f"for a language model of {depth} layers (the pruning runs after layer L2 - 1)")
        feature = None
        if method.selector == "cls":
            if family != "llava":
                raise ValueError(f"selector: 'cls' reads one CLS row per image (LLaVA-1.5's tower); {family} has "
                                 "tiles or no CLS: use 'uniform', 'random' or 'seg_first'")
            layer = model.config.vision_feature_layer
            blocks = len(adapter(family).vision_blocks(model))
            feature = layer % (blocks + 1) - 1  # hidden_states[h] is encoder layer h - 1's output
        return cls(**{**kwargs, "feature_layer": feature})

    # -- the plan ----------------------------------------------------------------------------------------------
    def vlm_plan(self):
        from prunelab.common.vlm_plan import Needs, Stage, VLMPlan

        if self.selector == "cls" and self.feature_layer is None:
            raise ValueError("feature_layer: the 'cls' selector reads the tower; build it with "
                             "LVLMCSP.for_model(model)")
        cls_needs = Needs(vision_layers=(self.feature_layer,), cls_row=True) if self.selector == "cls" else Needs()
        seg = Needs(rows=(self.seg_token_id if self.seg_token_id is not None else "last",))
        return VLMPlan((
            Stage("llm", self._cluster, layer=-1, needs=cls_needs, budget=self._cluster_budget,
                  exact=self.selector != "seg_first", name="LVLM_CSP clustering"),
            Stage("llm", self._scatter, layer=self.scatter_layer - 1, reactivate=True, name="LVLM_CSP scattering"),
            Stage("llm", self._prune, layer=self.prune_layer - 1, needs=seg, budget=self._keep_budget,
                  name="LVLM_CSP pruning"),
        ))

    def _cluster_budget(self, img) -> int:
        n = img.embeds.shape[0]
        return n if self.selector == "seg_first" else _count(self.clusters, n, "clusters")

    def _keep_budget(self, img) -> int:
        return _count(self.keep, img.embeds.shape[0], "keep")

    # -- stage 1: clustering -----------------------------------------------------------------------------------
    def _cluster(self, ctx) -> list[Reduction]:
        if self.seg_token_id is not None:
            missing = [b for b in range(ctx.batch_size) if not bool((ctx.input_ids[b] == self.seg_token_id).any())]
            if missing:
                raise ValueError(f"seg_token_id: prompts {missing} of the batch hold no [SEG] token "
                                 f"({self.seg_token_id}); LVLM_CSP prunes by its attention at prefill")
        self._scratch.clear()
        order: dict[int, int] = {}
        out = []
        for i, img in enumerate(ctx.images):
            n, device = img.embeds.shape[0], img.embeds.device
            k = order[img.span.sample] = order.get(img.span.sample, -1) + 1  # the image's rank in its prompt
            reps = self._representatives(img, n, k, device)
            if self.scatter_mode != "reembed":
                self._scratch[i] = (img.embeds.detach().clone(), reps, selection.assign(img.embeds.detach(), reps))
            out.append(Reduction(reps[None], n))
        return out

    def _representatives(self, img, n: int, k: int, device) -> torch.Tensor:
        if self.selector == "uniform":
            return selection.uniform(n, img.budget, device)
        if self.selector == "random":
            return selection.random_tokens(n, img.budget, torch.Generator().manual_seed(self.seed + k), device)
        if self.selector == "cls":
            row = img.cls_row[self.feature_layer]  # [tiles, H, P]
            if row.shape[0] != 1 or row.shape[-1] != n:
                raise ValueError(f"selector: 'cls' needs one CLS row over the image's {n} tokens, got "
                                 f"{tuple(row.shape)}")
            return selection.cls_attention(row[0], img.budget)
        masks = self.instances(img)
        if not isinstance(masks, torch.Tensor) or masks.shape[-1] != n:
            raise ValueError(f"instances: expected bool [instances, {n}] masks for image {img.span.image}")
        return selection.seg_first(masks.to(device), _count(self.clusters, n, "clusters"))

    # -- stage 2: scattering -----------------------------------------------------------------------------------
    def _scatter(self, ctx) -> list[Reduction]:
        out = []
        for i, img in enumerate(ctx.images):
            n = img.token_ids.numel()
            if self.scatter_mode != "reembed" and bool((~img.held).any()):
                inputs, reps, members = self._scratch[i]
                if not torch.equal(img.held.nonzero().flatten(), reps):
                    raise RuntimeError("scatter_mode: the tokens held at the scattering layer are not the "
                                       "representatives (another method's LLM stage ran in between)")
                values = selection.scatter(self.scatter_mode, inputs, img.embeds[img.held], reps, members)
                img.embeds[~img.held] = values[~img.held].to(img.embeds.dtype)
            out.append(Reduction.keep_all(1, n, img.embeds.device))
        self._scratch.clear()
        return out

    # -- stage 3: pruning --------------------------------------------------------------------------------------
    def _prune(self, ctx) -> list[Reduction]:
        key = self.seg_token_id if self.seg_token_id is not None else "last"
        return [Reduction(topk_sorted(selection.seg_scores(img.rows[key]), img.budget)[None], img.embeds.shape[0])
                for img in ctx.images]
