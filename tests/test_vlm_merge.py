"""Merging stages on the VLM engine: the kept rows carry the merged values into what runs next, inside the tower,
after the projector and after an LLM layer."""

from __future__ import annotations

import pytest
import torch

import prunelab
from prunelab.common.reduction import Merge, Reduction
from prunelab.common.tiny_vlm import tiny_inputs, tiny_vlm
from prunelab.common.vlm import Stage, VLMPlan
from prunelab.common.vlm_layout import adapter

IMAGES = [1, 2]


def _first_half_merged(n: int, rows: int = 1, average: bool = True) -> Reduction:
    """Keep the first half; every dropped token merges into the first kept slot."""
    k = max(1, n // 2)
    src = torch.arange(k, n).expand(rows, -1)
    weight = torch.full(src.shape, 1.0 if average else 1.0 / max(1, n - k))
    merge = Merge(src, torch.zeros_like(src), weight, average=average)
    return Reduction(torch.arange(k).expand(rows, -1), n, merge=merge)


class HalfMerge:
    def __init__(self, where: str, layer=None, average: bool = True):
        self.where, self.layer, self.average = where, layer, average

    def vlm_plan(self) -> VLMPlan:
        return VLMPlan((Stage(self.where, self.select, layer=self.layer, budget=self.budget),))

    def budget(self, img) -> int:
        return max(1, img.token_ids.shape[-1] // 2)

    def select(self, ctx):
        return [_first_half_merged(img.token_ids.shape[-1], img.token_ids.shape[0] if img.token_ids.dim() == 2 else 1,
                                   self.average) for img in ctx.images]


def _layer_input(model, layer: int, store: list):
    def grab(_m, args, kwargs):
        store.append(args[0] if args else kwargs["hidden_states"])
    return model.model.language_model.layers[layer].register_forward_pre_hook(grab, with_kwargs=True)


def _expected(rows: torch.Tensor, average: bool) -> torch.Tensor:
    n = rows.shape[0]
    k = max(1, n // 2)
    out = rows[:k].clone()
    out[0] = (rows[0] + rows[k:].sum(0)) / (1 + n - k) if average else rows[0] + rows[k:].mean(0)
    return out


def _check_layer_input(family: str, method: HalfMerge, layer: int, average: bool) -> None:
    """The input rows of LLM ``layer`` for each image's kept tokens equal the merge of the dense rows."""
    model = tiny_vlm(family)
    x = tiny_inputs(model, family, IMAGES, padding_side="left")
    dense = []
    hook = _layer_input(model, layer, dense)
    model(**x)
    with prunelab.apply(model, method) as h:
        pruned = []
        inner = _layer_input(model, layer, pruned)
        model(**x)
        inner.remove()
    hook.remove()
    positions = h.state.positions  # prompt position of each row the language model ran on
    for img, kept in zip(h.state.images, h.state.kept):
        b, span = img.span.sample, img.span.positions
        expected = _expected(dense[0][b, span], average)
        rows = [int((positions[b] == p).nonzero()) for p in span[kept].tolist()]
        torch.testing.assert_close(pruned[0][b, rows], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("average", [True, False])
@torch.no_grad()
def test_projector_merge_reaches_the_language_model(family, average):
    _check_layer_input(family, HalfMerge("projector", average=average), 0, average)


@torch.no_grad()
def test_llm_merge_reaches_the_next_layer():
    _check_layer_input("llava", HalfMerge("llm", layer=0), 1, True)


@torch.no_grad()
def test_tower_merge_reaches_the_projector():
    """A stage after the feature layer's own encoder layer changes the features the projector reads."""
    model = tiny_vlm("llava")
    x = tiny_inputs(model, "llava", IMAGES, padding_side="left")
    feature = model.config.vision_feature_layer % (len(adapter("llava").vision_blocks(model)) + 1)
    dense = model.model.vision_tower(x["pixel_values"], output_hidden_states=True).hidden_states[feature][:, 1:]
    seen = []
    with prunelab.apply(model, HalfMerge("vision", layer=feature - 1, average=False)):
        hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        model(**x)
        hook.remove()
    k = dense.shape[1] // 2
    for t in range(dense.shape[0]):
        torch.testing.assert_close(seen[0][t, :k], _expected(dense[t], False), atol=1e-5, rtol=1e-5)
        assert bool((seen[0][t, k:] == 0).all())
