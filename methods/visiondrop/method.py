"""VisionDrop's method object and its VLM plan (arXiv 2506.22283, AAAI 2026).

Stage 0 runs where the vision features are read, as a tower stage: on CLIP towers (LLaVA-1.5, LLaVA-NeXT per tile)
after the feature layer (LLaVA's ``vision_feature_layer``), whose result is that layer's output as the projector
reads it, merged rows included; on Qwen2.5-VL after the last block, on merge units, before the merger. Stages 1..S
run after LLM layers ``llm_layers`` at prefill, scored with the next layer's projections (the layer the drop
precedes), and renumber the positions after them (1-D RoPE). Every stage keeps the top-``d`` tokens by visual-only
attention and merges the rest into ``c`` contextual tokens (``selection.py``).

Official repository: ``Ruixxxx/VisionDrop`` (Apache-2.0), compared at commit f7a9444 (the snapshot in this workspace's
code index; the live repository was not reachable). Nothing is copied; README.md maps the paper and the official code
to this file and lists every difference (the CLS slot, token order, the LLM score layer, positions after a drop).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import MappingProxyType

import torch

from prunelab.common.reduction import Reduction
from prunelab.common.tokens import keep_count
from prunelab.common.validate import check_bool, check_budget, check_choice, check_ints, check_real
from prunelab.methods.visiondrop import selection
from prunelab.methods.visiondrop.schedule import OFFICIAL_BUDGET, budget_schedule, check_schedule, stage_counts

__all__ = ["LLM_LAYERS", "PAPER_BUDGETS", "VisionDrop"]

PAPER_BUDGETS = MappingProxyType({
    "llava-1.5": (192, 128, 64, 32),  # average T of 576 (paper: 192 and 32 in its tables; 32 the official schedule)
    "llava-next": (128, 64, 32),  # T per tile, about 640 / 320 / 160 for five tiles (paper: 2880 -> 320)
    "qwen2_5_vl": (0.333, 0.222, 0.111),  # shares of each image's merge units (not in the paper)
})
"""The budgets the full preset runs at, per model."""

LLM_LAYERS = (7, 15, 23)
"""0-based LLM layers after which the official code drops (its ``--layer_list [8,16,24]``: before layers 8, 16, 24)."""

VIT_QUERIES = ("cls", "mean")
SCORE_MASKS = ("causal", "bidirectional")
POSITIONS = ("compact", "keep")


@dataclass(frozen=True)
class VisionDrop:
    """VisionDrop's hyperparameters and its VLM plan; build it with :meth:`for_model`, which reads the model.

    Attributes:
        budget: T, the average visual tokens per image over the LLM layers: a count (LLaVA-1.5 and, per encoder
            tile, LLaVA-NeXT; the paper's 32 and others) or a share of the tokens of one encoder image (a CLIP
            tile's patches, a Qwen2.5-VL image's merge units) in (0, 1], made a count by ``keep_count``. The
            schedule follows :func:`~prunelab.methods.visiondrop.schedule.budget_schedule` (T = 32: the official
            ``[42, 6]`` then ``[[30,5],[22,4],[16,3]]``); it needs three LLM stages. ``None``: 32 unless ``schedule``
            is given.
        schedule: explicit ``(dominant, contextual)`` pairs, stage 0 first, then one per ``llm_layers`` entry: counts
            (stage 0 per CLIP tile or Qwen image; LLM stages scaled to each image, see ``schedule.py``) or fractions
            of the tokens each stage receives. Excludes ``budget``.
        contextual_share: the dominant:contextual split of ``budget``'s stages, as the contextual share of each
            stage's size; ``None``: the official per-stage shares (6/48, 5/35, 4/26, 3/19).
        llm_layers: 0-based LLM layers after which stages 1..S run (official boundaries 8, 16, 24).
        vit_query: encoder score: ``"cls"``, the CLS row summed over heads (official, CLIP only), or ``"mean"``, the
            attention of the mean patch query (the paper's CLS-free variant; the only one on Qwen2.5-VL).
            ``None``: the family's (set by :meth:`for_model`).
        llm_score_mask: the LLM-stage score's mask: ``"causal"`` (official: an image query sees the keys before it),
            or ``"bidirectional"`` (an ablation: every image query sees every valid key of the prompt, later text
            included; the layers themselves stay causal).
        llm_positions: positions after an LLM stage: ``"compact"`` (official: the kept tokens are renumbered
            contiguously and decoding continues from there, so every later position moves down by the tokens
            dropped) or ``"keep"`` (kept tokens keep their positions). ``None``: ``"compact"`` on LLaVA-1.5 and
            LLaVA-NeXT, ``"keep"`` on Qwen2.5-VL, whose M-RoPE ids are kept (set by :meth:`for_model`).
        official_quirks: the official counts where they differ: the CLS is one of stage 0's dominant tokens even
            where transformers' LLaVA gives it no slot (``d0 - 1`` dominant patches), the LLM stages keep the
            schedule's counts as they are (one 48-token image per sample), and a GQA language model is refused (the
            official scorer has no ``repeat_kv``).
        feature_layer: the encoder layer whose statistics stage 0 reads (set by :meth:`for_model`).
        family: the model family (set by :meth:`for_model`).
        cls_in_prompt: the CLS reaches the language model as a visual token (``vision_feature_select_strategy=
            "full"``; set by :meth:`for_model`); it is then one of stage 0's dominant tokens, as in the official code.
    """

    budget: int | float | None = None
    schedule: tuple | None = None
    contextual_share: float | None = None
    llm_layers: tuple[int, ...] = LLM_LAYERS
    vit_query: str | None = None
    llm_score_mask: str = "causal"
    llm_positions: str | None = None
    official_quirks: bool = False
    feature_layer: int | None = None
    family: str | None = None
    cls_in_prompt: bool = False

    def __post_init__(self):
        put = functools.partial(object.__setattr__, self)
        if self.budget is not None:
            put("budget", check_budget(self.budget, "budget"))
        put("llm_layers", check_ints(self.llm_layers, "llm_layers", low=0))
        if list(self.llm_layers) != sorted(set(self.llm_layers)):
            raise ValueError(f"llm_layers: must be strictly ascending, got {list(self.llm_layers)}")
        if self.contextual_share is not None:
            put("contextual_share", check_real(self.contextual_share, "contextual_share", low=0.0, high=1.0,
                                               high_open=True))
        if self.vit_query is not None:
            check_choice(self.vit_query, "vit_query", VIT_QUERIES)
        check_choice(self.llm_score_mask, "llm_score_mask", SCORE_MASKS)
        if self.llm_positions is not None:
            check_choice(self.llm_positions, "llm_positions", POSITIONS)
        for name in ("official_quirks", "cls_in_prompt"):
            put(name, check_bool(getattr(self, name), name))
        if self.schedule is not None:
            if self.budget is not None:
                raise ValueError("schedule: give either budget or schedule, not both")
            if self.contextual_share is not None:
                raise ValueError("contextual_share: splits budget's stages; an explicit schedule carries its split")
            put("schedule", check_schedule(self.schedule, 1 + len(self.llm_layers)))
            return
        if len(self.llm_layers) != 3:
            raise ValueError(f"llm_layers: the budget rule derives four stages for three LLM stages (the paper's); "
                             f"with llm_layers={list(self.llm_layers)} give an explicit schedule")
        if not isinstance(self.budget, float):  # raises naming budget when T is too small
            budget_schedule(OFFICIAL_BUDGET if self.budget is None else self.budget, self.contextual_share)

    @classmethod
    def for_model(cls, model, **kwargs) -> VisionDrop:
        """VisionDrop for a transformers LLaVA-1.5 / LLaVA-NeXT / Qwen2.5-VL ``model``: the encoder layer stage 0
        reads, the family's encoder query, the CLS slot, and ``llm_layers`` checked against the language model."""
        from prunelab.common.vlm_layout import adapter, require_family

        family = require_family(model)
        depth = len(adapter(family).vision_blocks(model))
        method = cls(**kwargs)
        query = method.vit_query or ("mean" if family == "qwen2_5_vl" else "cls")
        cls_in_prompt = False
        positions = method.llm_positions or ("keep" if family == "qwen2_5_vl" else "compact")
        if family == "qwen2_5_vl":
            if query == "cls":
                raise ValueError("vit_query: Qwen2.5-VL's vision tower has no CLS token; use vit_query='mean'")
            if positions == "compact":
                raise ValueError("llm_positions: Qwen2.5-VL's M-RoPE ids are kept after a drop; use "
                                 "llm_positions='keep'")
            feature = depth - 1  # the merger reads the last block
        else:
            layer = model.config.vision_feature_layer
            if not isinstance(layer, int):
                raise ValueError(f"model: VisionDrop reads one vision_feature_layer, got {layer}")
            feature = layer % (depth + 1) - 1  # hidden_states[h] is encoder layer h - 1's output
            if not 0 <= feature <= depth - 2:
                raise ValueError(f"model: vision_feature_layer={layer} is encoder layer {feature}; stage 0 runs in "
                                 f"the tower after it, so it must lie in [0, {depth - 2}]")
            cls_in_prompt = model.config.vision_feature_select_strategy == "full"
        text = model.config.get_text_config()
        n_layers = text.num_hidden_layers
        bad = [k for k in method.llm_layers if k > n_layers - 2]
        if bad:
            raise ValueError(f"llm_layers: {bad} not in [0, {n_layers - 2}] for a language model of {n_layers} "
                             "layers (a later layer must exist)")
        heads, kv_heads = text.num_attention_heads, getattr(text, "num_key_value_heads", None)
        if method.official_quirks and method.llm_layers and kv_heads not in (None, heads):
            raise ValueError(f"official_quirks: the official LLM scorer pairs query and key heads without repeat_kv "
                             f"and does not run on this grouped-query model ({heads} query, {kv_heads} key-value "
                             "heads); use official_quirks=False (key heads expanded)")
        return cls(**{**kwargs, "vit_query": query, "llm_positions": positions, "feature_layer": feature,
                      "family": family, "cls_in_prompt": cls_in_prompt})

    # -- counts ------------------------------------------------------------------------------------------------
    @property
    def _source(self) -> str:
        return "schedule" if self.schedule is not None else "budget"

    def schedule_for(self, n_ref: int) -> tuple:
        """The schedule of an image whose encoder image (a CLIP tile, a Qwen2.5-VL image) has ``n_ref`` tokens."""
        if self.schedule is not None:
            return self.schedule
        budget = OFFICIAL_BUDGET if self.budget is None else self.budget
        if isinstance(budget, float):
            budget = keep_count(n_ref, budget, name="budget")
        return budget_schedule(budget, self.contextual_share)

    def counts(self, k: int, n: int, n_ref: int) -> tuple[int, int]:
        """``(d, c)`` at stage ``k`` for ``n`` candidate tokens; ``n_ref`` as in :meth:`schedule_for`. At stage 0
        ``d`` counts the CLS where it is one of the dominant tokens; the tower then picks ``d - 1`` patches."""
        schedule = self.schedule_for(n_ref)
        cls_slot = k == 0 and self._cls_dominant and isinstance(schedule[0][0], int)
        d, c = stage_counts(schedule, k, n + cls_slot, absolute=self.official_quirks, name=self._source)
        if d - cls_slot + c < 1:
            raise ValueError(f"{self._source}: stage 0 keeps only the CLS ({d} dominant incl. the CLS, no "
                             "contextual); at least one patch must stay")
        return d - cls_slot, c

    @property
    def _cls_dominant(self) -> bool:
        """Stage 0 counts the CLS among its dominant tokens (official): where the CLS reaches the language model,
        and under ``official_quirks`` on CLIP towers even where it does not."""
        return self.family != "qwen2_5_vl" and (self.cls_in_prompt or self.official_quirks)

    # -- the plan ----------------------------------------------------------------------------------------------
    def vlm_plan(self):
        from prunelab.common.vlm_plan import Needs, Stage, VLMPlan

        if self.feature_layer is None or self.family is None:
            raise ValueError("feature_layer: VisionDrop reads the model's encoder; build it with "
                             "VisionDrop.for_model(model)")
        f, mean = self.feature_layer, self.vit_query == "mean"
        needs = Needs(vision_layers=(f,), cls_row=not mean, queries=mean, keys=True)
        stages = [Stage("vision", self._stage0, layer=f, needs=needs, budget=self._budget0,
                        name="VisionDrop stage 0")]
        # The kernel's column means over the image's queries, with the keys and values of layer K + 1 (the official
        # boundary b = K + 1) on layer K's output.
        rows = Needs(rows=("image_mean",), llm_kv=True, causal=self.llm_score_mask == "causal", next_layer=True)
        renumber = (self.llm_positions or "compact") == "compact"
        for k, K in enumerate(self.llm_layers, 1):
            stages.append(Stage("llm", functools.partial(self._llm, k), layer=K, needs=rows, renumber=renumber,
                                budget=functools.partial(self._llm_budget, k), name=f"VisionDrop LLM {K}"))
        return VLMPlan(tuple(stages))

    # -- stage 0 -----------------------------------------------------------------------------------------------
    def _n_ref0(self, img) -> int:
        """Tokens of the encoder image before any drop: a CLIP tile's patches, a Qwen2.5-VL image's merge units."""
        keys = img.keys[self.feature_layer]  # [tiles, H, 1 + P, d] (CLS first) / [H, units, m*m, d]
        return keys.shape[1] if self.family == "qwen2_5_vl" else keys.shape[2] - 1

    def _budget0(self, img) -> int:
        d, c = self.counts(0, img.token_ids.shape[-1], self._n_ref0(img))
        return d + c

    def _stage0(self, ctx) -> list[Reduction]:
        out = []
        for img in ctx.images:
            n = img.token_ids.shape[-1]
            d, c = self.counts(0, n, self._n_ref0(img))
            if d + c >= n:
                rows = img.token_ids.shape[0] if img.token_ids.dim() == 2 else 1
                out.append(Reduction.keep_all(rows, n, img.token_ids.device))
                continue
            score, metric = self._qwen_stats(img) if self.family == "qwen2_5_vl" else self._clip_stats(img)
            red = selection.visiondrop_reduction(score, metric, d, c)
            out.append(red)
        return out

    def _clip_stats(self, img) -> tuple[torch.Tensor, torch.Tensor]:
        """Per tile: scores [tiles, n] and the merge metric [tiles, n, d] of the patches the tile holds."""
        f, ids = self.feature_layer, img.token_ids
        keys = img.keys[f]  # [tiles, H, 1 + P, d], the CLS first
        rows = torch.cat([torch.zeros_like(ids[:, :1]), ids + 1], 1)  # the CLS, then the held patches
        held = keys.gather(2, rows[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1]))
        metric = selection.head_mean_keys(held)[:, 1:]
        if self.vit_query == "mean":
            q = img.queries[f]
            q = q.gather(2, rows[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
            return selection.mean_query_scores(q, held, keys.shape[-1] ** -0.5, prefix=1), metric
        cls_row = img.cls_row[f]  # [tiles, H, P] ("default") or [tiles, H, 1 + P] ("full": the CLS column first)
        offset = cls_row.shape[-1] - (keys.shape[2] - 1)
        score = selection.cls_scores(cls_row.gather(2, (ids + offset)[:, None].expand(-1, cls_row.shape[1], -1)))
        return score, metric

    def _qwen_stats(self, img) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: merge-unit scores [1, n] (the mean patch query's attention, summed over each unit's patches)
        and the metric [1, n, m*m*d] (head-mean keys of the unit's patches, concatenated as the merger does)."""
        f, ids = self.feature_layer, img.token_ids[0]  # [n] merge units in raster order
        q, k = img.queries[f][:, ids], img.keys[f][:, ids]  # [H, n, m*m, d]
        H, n, m2, dh = k.shape
        patches = selection.mean_query_scores(q.reshape(1, H, n * m2, dh), k.reshape(1, H, n * m2, dh), dh ** -0.5)
        metric = selection.head_mean_keys(k.reshape(H, n * m2, dh)).reshape(1, n, m2 * dh)
        return patches.view(1, n, m2).sum(-1), metric

    # -- LLM stages --------------------------------------------------------------------------------------------
    def _candidates(self, img) -> torch.Tensor:
        """bool [n]: the visual tokens a stage scores and merges; NeXT's ``image_newline`` tokens always stay."""
        if img.span.newline is None:
            return torch.ones(img.token_ids.numel(), dtype=torch.bool, device=img.token_ids.device)
        return ~img.span.newline.to(img.token_ids.device)[img.token_ids]

    def _n_ref(self, img) -> int:
        span = img.span
        return span.num_tokens if self.family == "qwen2_5_vl" else span.grid[0] * span.grid[1]

    def _llm_budget(self, k: int, img) -> int:
        cand = self._candidates(img)
        d, c = self.counts(k, int(cand.sum()), self._n_ref(img))
        return d + c + int((~cand).sum())

    def _llm(self, k: int, ctx) -> list[Reduction]:
        out = []
        for img in ctx.images:
            cand = self._candidates(img)
            n = img.token_ids.numel()
            d, c = self.counts(k, int(cand.sum()), self._n_ref(img))
            if d + c >= int(cand.sum()):
                out.append(Reduction.keep_all(1, n, img.token_ids.device))
                continue
            score = img.rows["image_mean"].float()  # every token of the image a query, NeXT's newlines included
            metric = selection.head_mean_keys(img.kv[0])  # post-RoPE keys of the layer [n, d]
            out.append(selection.visiondrop_reduction(score[None], metric[None], d, c, cand[None]))
        return out
