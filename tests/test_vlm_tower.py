"""Stages inside the vision tower: later encoder layers run on the kept patches only, and what they compute is what
the tower would compute on those patches alone."""

from __future__ import annotations

import pytest
import torch

import prunelab
from prunelab.common.reduction import Reduction
from prunelab.common.tiny_vlm import tiny_inputs, tiny_vlm
from prunelab.common.vlm import Stage, VLMPlan
from prunelab.common.vlm_layout import adapter

IMAGES = [1, 2]


class KeepEvery:
    """A vision stage after encoder ``layer`` keeping every ``step``-th patch (per image: ``steps[i]``)."""

    def __init__(self, layer: int = 0, steps=(2,)):
        self.layer, self.steps, self.seen, self.calls = layer, steps, [], 0

    def vlm_plan(self) -> VLMPlan:
        return VLMPlan((Stage("vision", self.select, layer=self.layer, budget=self.budget, name="every"),))

    def budget(self, img) -> int:  # called once per image, in order, before select
        step = self.steps[self.calls % len(self.steps)]
        self.calls += 1
        return len(range(0, img.token_ids.shape[-1], step))

    def select(self, ctx):
        self.seen.append(ctx)
        self.calls = 0
        out = []
        for i, img in enumerate(ctx.images):
            step = self.steps[i % len(self.steps)]
            n = img.token_ids.shape[-1]
            keep = torch.arange(0, n, step).expand(img.token_ids.shape[0], -1)
            out.append(Reduction(keep, n))
        return out


def _block_rows(model, family):
    rows, undo = {}, []
    for i, block in enumerate(adapter(family).vision_blocks(model)):
        def grab(_m, args, _i=i):
            rows[_i] = args[0].shape[-2]
        undo.append(block.register_forward_pre_hook(grab).remove)
    return rows, undo


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl"])
@torch.no_grad()
def test_later_encoder_layers_run_on_the_kept_patches(family):
    model = tiny_vlm(family)
    x = tiny_inputs(model, family, IMAGES, padding_side="left")
    dense, undo = _block_rows(model, family)
    model(**x)
    for fn in undo:
        fn()
    with prunelab.apply(model, KeepEvery()) as h:
        rows, undo = _block_rows(model, family)  # hooked after the stage's: they see what the layer runs on
        model(**x)
        for fn in undo:
            fn()
    assert rows[0] == dense[0]
    for b in range(1, len(dense)):
        if family == "qwen2_5_vl":  # packed rows: every other merge unit of 4 patches
            assert rows[b] == dense[b] // 2
        else:  # CLS + every other patch of each tile
            assert rows[b] == 1 + (dense[b] - 1 + 1) // 2
    name, kept = h.state.history[0]
    assert name == "every" and len(kept) == len(h.state.images)


@torch.no_grad()
def test_clip_tower_stage_equals_running_the_kept_patches_alone():
    model = tiny_vlm("llava")
    x = tiny_inputs(model, "llava", IMAGES, padding_side="left")
    tower = model.model.vision_tower
    layers = adapter("llava").vision_blocks(model)
    seen = []
    hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with prunelab.apply(model, KeepEvery(layer=0, steps=(3,))):
        model(**x)
    hook.remove()
    dense = tower(x["pixel_values"], output_hidden_states=True).hidden_states
    keep = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.arange(0, dense[1].shape[1] - 1, 3)])
    h = dense[1][:, keep]  # layer 0's output, CLS and the kept patches
    feature = model.config.vision_feature_layer % (len(layers) + 1)  # hidden_states entry the projector reads
    for layer in layers[1:feature]:
        h = layer(h, None)
    pruned = seen[0]  # [images, P, C]: the kept rows, zeros where dropped
    torch.testing.assert_close(pruned[:, keep[1:] - 1], h[:, 1:], atol=1e-6, rtol=0)
    dropped = torch.ones(pruned.shape[1], dtype=torch.bool)
    dropped[keep[1:] - 1] = False
    assert bool((pruned[:, dropped] == 0).all())


@torch.no_grad()
def test_qwen_tower_stage_with_ragged_budgets_equals_each_image_alone():
    """Images keep different counts (cu_seqlens recounted per image and window): batched equals one at a time."""
    model = tiny_vlm("qwen2_5_vl")
    x = tiny_inputs(model, "qwen2_5_vl", [2], padding_side="left")  # one sample, two images
    seen = []
    with prunelab.apply(model, KeepEvery(layer=1, steps=(2, 3))) as h:
        hook = model.model.visual.merger.register_forward_hook(lambda m, a, o: seen.append(o))  # after the scatter
        model(**x)
        kept = [k.clone() for k in h.state.history[0][1]]
        grid, pixels = x["image_grid_thw"], x["pixel_values"]
        sizes = (grid.prod(-1)).tolist()
        alone = []
        for i, part in enumerate(pixels.split(sizes)):
            h.method.steps = ((2, 3)[i],)
            model.model.visual(part, grid_thw=grid[i:i + 1])
            alone.append(seen[-1])
    hook.remove()
    batched = seen[0]  # [units, D] in window order, zeros where dropped
    assert [k.numel() for k in kept] == [len(range(0, int(g.prod()) // 4, s)) for g, s in zip(grid, (2, 3))]
    window_index = adapter("qwen2_5_vl").windows(model, grid)[0]
    raster = batched[torch.argsort(window_index)]
    units = (grid.prod(-1) // 4).tolist()
    for i, (part, k) in enumerate(zip(raster.split(units), kept)):
        own = alone[i][torch.argsort(adapter("qwen2_5_vl").windows(model, grid[i:i + 1])[0])]
        torch.testing.assert_close(part[k], own[k], atol=1e-5, rtol=0)
        assert bool((part.abs().sum(-1) > 0).sum() == k.numel())


@torch.no_grad()
def test_bad_tower_stages_raise_naming_the_parameter():
    model = tiny_vlm("llava_next")
    depth = len(adapter("llava_next").vision_blocks(model))
    with pytest.raises(ValueError, match="layer"):
        prunelab.apply(model, KeepEvery(layer=depth - 1))


class Reading(KeepEvery):
    """KeepEvery that also reads the CLS row at layer 1, after its stage at layer 0."""

    def vlm_plan(self) -> VLMPlan:
        from prunelab.common.vlm import Needs

        return VLMPlan((Stage("vision", self.select, layer=0, budget=self.budget, name="every"),
                        Stage("projector", self.read, needs=Needs(vision_layers=(1,), cls_row=True))))

    def read(self, ctx):
        self.seen.append(ctx)
        return [Reduction(torch.arange(img.token_ids.numel())[None], img.token_ids.numel()) for img in ctx.images]


@torch.no_grad()
def test_clip_images_keeping_different_counts_equal_each_image_alone():
    """Ragged images in one CLIP batch (padding rows masked as keys): features and statistics as if alone."""
    model = tiny_vlm("llava")
    x = tiny_inputs(model, "llava", [3], padding_side="left")  # one prompt, three images
    seen = []
    method = Reading(steps=(2, 3, 4))
    with prunelab.apply(model, method) as h:
        hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        model(**x)
        batched, stats = seen[-1], [img.cls_row[1] for img in method.seen[-1].images]
        kept = [k.clone() for k in h.state.history[0][1]]
        for i in range(3):
            method.steps = ((2, 3, 4)[i],)
            features = model.model.vision_tower(x["pixel_values"][i:i + 1], output_hidden_states=True)
            alone = features.hidden_states[model.config.vision_feature_layer][:, 1:]
            torch.testing.assert_close(batched[i, kept[i]], alone[0, kept[i]], atol=1e-5, rtol=1e-5)
            row = h.state.stats["cls_row"][1][0]  # this lone image's CLS row at layer 1: [1, H, 1 + K]
            torch.testing.assert_close(stats[i][0][:, kept[i]], row[0, :, 1:], atol=1e-6, rtol=1e-5)
        hook.remove()
    assert [k.numel() for k in kept] == [8, 6, 4]


@torch.no_grad()
def test_qwen_stage_after_the_last_block_runs_before_the_merger():
    model = tiny_vlm("qwen2_5_vl")
    depth = len(adapter("qwen2_5_vl").vision_blocks(model))
    x = tiny_inputs(model, "qwen2_5_vl", IMAGES, padding_side="left")
    dense = model(**x).logits
    with prunelab.apply(model, KeepEvery(layer=depth - 1, steps=(1,))):  # keeps everything
        torch.testing.assert_close(model(**x).logits, dense, atol=1e-5, rtol=0)
    rows = []
    with prunelab.apply(model, KeepEvery(layer=depth - 1)) as h:
        hook = model.model.visual.merger.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
        model(**x)
        hook.remove()
    units = (x["image_grid_thw"].prod(-1) // 4).tolist()
    assert rows == [4 * sum(len(range(0, n, 2)) for n in units)]
    assert [k.numel() for k in h.state.history[0][1]] == [len(range(0, n, 2)) for n in units]
