"""FlowCut's method object and its VLM plan (Tong et al., NeurIPS 2025, arXiv 2505.19536).

FlowCut prunes inside the vision encoder, progressively: after every encoder layer before the one whose output the
projector reads (LLaVA's feature layer; Qwen2.5-VL's last block), it scores the remaining patches
(``scores.py``), accumulates the scores with an EMA over layers, and drops patches only when the number of layers
left, ``R = feature_layer - l - 1``, is even, by a count set by how concentrated the CLS attention is; at ``R = 0``
the cut lands exactly on the target. On LLaVA-NeXT and Qwen2.5-VL a second cut inside language-model layer 1 keeps
the target ``T`` per image, scored by the last instruction token.

Official repository: ``TungChintao/FlowCut`` (Apache-2.0); no code is copied. README.md maps the paper and the
official code to this file and lists every difference.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import MappingProxyType

import torch

from prunelab.common.reduction import Reduction
from prunelab.common.tokens import keep_count
from prunelab.common.validate import check_bool, check_budget, check_choice, check_int, check_real
from prunelab.methods.flowcut import scores

__all__ = ["PAPER_BUDGETS", "FlowCut", "LLAVA15_BUDGETS"]

LLAVA15_BUDGETS = (192, 128, 64)
"""The paper's LLaVA-1.5 budgets T (visual tokens per image)."""

PAPER_BUDGETS = MappingProxyType({
    "llava-1.5": LLAVA15_BUDGETS,  # of 576 (official README)
    "llava-next": (640, 320, 160),  # of 2880 (official README)
    "qwen2_5_vl": (0.333, 0.222, 0.111),  # keep ratios (official README, Qwen2-VL table)
})
"""The budgets the official code is run at, per model."""


@dataclass(frozen=True)
class FlowCut:
    """FlowCut's hyperparameters and its VLM plan; build it with :meth:`for_model`, which reads the encoder's depth.

    Attributes:
        budget: T, visual tokens kept per image: a count (the paper's 192 / 128 / 64 on LLaVA-1.5) or a fraction
            of the image's tokens in (0, 1] (the official Qwen settings 33.3 / 22.2 / 11.1 %). LLaVA-NeXT: each
            crop keeps ``T // 2`` patches in the encoder, and LLM layer 1 cuts the image to T; Qwen2.5-VL: the
            encoder keeps ``2T`` merge units, LLM layer 1 cuts to T.
        semantic: ``"softmax"`` (the official code: unscaled softmax of the CLS value against the values) or
            ``"cosine"`` (the paper's description).
        ema_weight: weight of the previous cumulative score (the official 0.5).
        llm_layer: the LLM layer after which LLaVA-NeXT and Qwen2.5-VL are cut to T (the official 1).
        official_quirks: the official code's choices: one prune count for every image of a forward (its maximum);
            on Qwen2.5-VL also patches, not merge units, pruned in the encoder (``8T`` of them), joined by the
            merger four at a time in raster order, and the resulting ``2T`` tokens given the first ``2T`` M-RoPE
            ids of the image's span.
        feature_layer: the encoder layer whose output the projector reads (set by :meth:`for_model`); on
            Qwen2.5-VL the tower's depth: the final cut comes after its last block, before the merger.
        family: the model family (set by :meth:`for_model`).
    """

    budget: int | float = 64
    semantic: str = "softmax"
    ema_weight: float = 0.5
    llm_layer: int = 1
    official_quirks: bool = False
    feature_layer: int | None = None
    family: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "budget", check_budget(self.budget, "budget"))
        check_choice(self.semantic, "semantic", scores.SEMANTICS)
        object.__setattr__(self, "ema_weight", check_real(self.ema_weight, "ema_weight", low=0.0, high=1.0))
        object.__setattr__(self, "llm_layer", check_int(self.llm_layer, "llm_layer", low=0))
        check_bool(self.official_quirks, "official_quirks")
        if self.feature_layer is not None:
            object.__setattr__(self, "feature_layer", check_int(self.feature_layer, "feature_layer", low=1))
        object.__setattr__(self, "_ema", {})  # per forward: cumulative scores of the rows each image holds

    @classmethod
    def for_model(cls, model, **kwargs) -> FlowCut:
        """FlowCut for ``model``: its family and the encoder layer the projector reads."""
        from prunelab.common.vlm_layout import adapter, require_family

        family = require_family(model)
        depth = len(adapter(family).vision_blocks(model))
        if family == "qwen2_5_vl":
            feature = depth  # the merger reads the last block: the final cut comes after it (official Qwen code)
        else:
            layer = model.config.vision_feature_layer
            if not isinstance(layer, int):
                raise ValueError(f"model: FlowCut needs one vision_feature_layer, got {layer}")
            feature = layer % (depth + 1) - 1  # hidden_states[h] is layer h - 1's output
        return cls(feature_layer=feature, family=family, **kwargs)

    # -- the plan ------------------------------------------------------------------------------------------
    def vlm_plan(self):
        from prunelab.common.vlm_plan import Needs, Stage, VLMPlan

        if self.feature_layer is None or self.family is None:
            raise ValueError("feature_layer: FlowCut reads the encoder's depth; build it with FlowCut.for_model(model)")
        qwen = self.family == "qwen2_5_vl"
        stages = []
        for layer in range(self.feature_layer):
            needs = (Needs(vision_layers=(layer,), queries=True, keys=True, values=True) if qwen
                     else Needs(vision_layers=(layer,), cls_row=True, values=True))
            stages.append(Stage("vision", functools.partial(self._encoder, layer), layer=layer, needs=needs,
                                exact=False, name=f"FlowCut encoder {layer}", patches=qwen and self.official_quirks))
        if self.family != "llava":
            stages.append(Stage("llm", self._llm, layer=self.llm_layer, needs=Needs(rows=("last",), llm_kv=True),
                                exact=False, name=f"FlowCut LLM {self.llm_layer}"))
        return VLMPlan(tuple(stages))

    def target(self, n: int) -> int:
        """T for an image of ``n`` visual tokens (merge units on Qwen2.5-VL)."""
        return min(n, self.budget) if isinstance(self.budget, int) else keep_count(n, self.budget, name="budget")

    def _encoder_target(self, layer: int, img) -> int:
        """Patches (Qwen2.5-VL: merge units, or patches under ``official_quirks``) each tile keeps when the encoder
        is done."""
        if self.family == "qwen2_5_vl":
            units, m2 = img.keys[layer].shape[1:3]
            per = m2 if self.official_quirks else 1  # the official 4 * 2T patches, or 2T units
            return per * min(units, 2 * self.target(units))
        full = img.cls_row[layer].shape[-1]  # the tile's patches before any drop
        if self.family == "llava":
            return self.target(full)
        total = self.budget if isinstance(self.budget, int) else self.target(full * img.token_ids.shape[0])
        return max(1, min(full, total // 2))  # NeXT: T / 2 per crop

    # -- the encoder stages ----------------------------------------------------------------------------------
    def _scores(self, layer: int, img) -> tuple[torch.Tensor, torch.Tensor]:
        """The relation score ``a`` and the layer score ``S`` of the rows the tile holds ([tiles, n])."""
        ids = img.token_ids
        if self.family == "qwen2_5_vl":  # the mean query as the global query, no semantic term
            m2, d = img.keys[layer].shape[2:]
            units = not self.official_quirks  # merge units of m2 patches, or (official) patches
            rows = (ids[0, :, None] * m2 + torch.arange(m2, device=ids.device)).flatten() if units else ids[0]
            q, k, v = (img_x[layer].flatten(1, 2)[:, rows].float() for img_x in (img.queries, img.keys, img.values))
            a = ((q.mean(1, keepdim=True) @ k.transpose(-1, -2)) / math.sqrt(d)).softmax(-1)[:, 0].mean(0)
            rho = v.mean(0).abs().sum(-1)
            if not units:
                return a[None], (a * rho)[None]
            a, rho = a.view(-1, m2), rho.view(-1, m2)
            return a.sum(-1)[None], (a * rho).mean(-1)[None]
        rows = torch.cat([torch.zeros_like(ids[:, :1]), ids + 1], 1)  # the CLS, then the rows held
        v, cls = img.values[layer], img.cls_row[layer]  # [tiles, H, 1 + P, d], [tiles, H, P]
        values = v.gather(2, rows[:, None, :, None].expand(-1, v.shape[1], -1, v.shape[-1]))
        a = scores.relation(cls.gather(2, ids[:, None].expand(-1, cls.shape[1], -1)))
        return a, scores.layer_score(a, scores.semantic(values, self.semantic), scores.density(values))

    def _encoder(self, layer: int, ctx) -> list[Reduction]:
        if layer == 0:
            self._ema.clear()  # a new forward of the encoder
        remaining = self.feature_layer - layer - 1
        plans = []
        for i, img in enumerate(ctx.images):
            n, target = img.token_ids.shape[-1], self._encoder_target(layer, img)
            if n <= target:
                plans.append((n, None))
                continue
            a, s = self._scores(layer, img)
            cumulative = scores.ema(self._ema.get(i), s, self.ema_weight)
            self._ema[i] = cumulative
            drop = 0
            if remaining % 2 == 0:
                counts = [scores.prune_count(n, target, remaining, float(r)) for r in scores.entropy_ratio(a)]
                drop = max(counts)  # the tiles of one image keep one count
            plans.append((n - drop, cumulative))
        if self.official_quirks:  # one count for the whole forward: the largest prune over every image
            low = min(k for k, _ in plans)
            plans = [(max(low, 1), c) for _, c in plans]
        out = []
        for i, (img, (k, cumulative)) in enumerate(zip(ctx.images, plans)):
            n = img.token_ids.shape[-1]
            if cumulative is None or k >= n:
                out.append(Reduction(torch.arange(n, device=img.token_ids.device).expand(img.token_ids.shape[0], n), n))
                continue
            keep = torch.sort(cumulative, dim=-1, descending=True, stable=True).indices[:, :k].sort(-1).values
            self._ema[i] = cumulative.gather(1, keep)  # the EMA follows the surviving rows
            out.append(Reduction(keep.to(img.token_ids.device), n))
        return out

    # -- the LLM stage (LLaVA-NeXT, Qwen2.5-VL) ---------------------------------------------------------------
    def _llm(self, ctx) -> list[Reduction]:
        keys, values = ctx.kv
        out = []
        for img in ctx.images:
            b, n = img.span.sample, img.token_ids.numel()
            candidates = torch.ones(n, dtype=torch.bool, device=img.token_ids.device)
            if img.span.newline is not None:  # the official NeXT path has no newline tokens: never kept here
                candidates = ~img.span.newline.to(img.token_ids.device)[img.token_ids]
            total = img.span.num_tokens - (0 if img.span.newline is None else int(img.span.newline.sum()))
            k = max(1, min(self.target(total), int(candidates.sum())))
            if k >= int(candidates.sum()):  # nothing to cut: every row stays (newlines too)
                out.append(Reduction(torch.arange(n, device=img.token_ids.device)[None], n))
                continue
            r = img.rows["last"].float().mean(0)[0]  # [n]: the last token's attention, heads averaged
            v_img = img.kv[1].float()  # [Hkv, n, d]
            v_q = values[b, :, -1:].float()  # the last row is the last prompt token (rows are right-aligned)
            sigma = ((v_q @ v_img.transpose(-1, -2)) / math.sqrt(v_img.shape[-1]))[:, 0]
            sigma = sigma.masked_fill(~candidates, float("-inf")).softmax(-1).mean(0)
            rho = v_img.mean(0).abs().sum(-1)
            r = r.masked_fill(~candidates, 0)
            score = (scores.share(r) + scores.share(sigma)) * rho  # both terms are distributions over the image
            score = score.masked_fill(~candidates, float("-inf"))
            keep = torch.sort(score, descending=True, stable=True).indices[:k].sort().values
            out.append(Reduction(keep[None], n))
        return out
