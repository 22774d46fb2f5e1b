"""What a stage can read: the encoder attention's per-head queries, keys and values, an LLM layer's keys and values,
and the attention rows of every image query."""

from __future__ import annotations

import pytest
import torch
from vlm_helpers import eager_attentions

import prunelab
from prunelab.common.reduction import Reduction
from prunelab.common.tiny_vlm import tiny_inputs, tiny_vlm
from prunelab.common.vlm import Needs, Stage, VLMPlan

IMAGES = [1, 2]


class Reader:
    """Keeps everything; records the contexts of one stage."""

    def __init__(self, where: str, needs: Needs, layer=None):
        self.where, self.needs, self.layer, self.seen = where, needs, layer, []

    def vlm_plan(self) -> VLMPlan:
        return VLMPlan((Stage(self.where, self.select, layer=self.layer, needs=self.needs),))

    def select(self, ctx):
        self.seen.append(ctx)
        return [Reduction(torch.arange(img.token_ids.shape[-1]).expand(*img.token_ids.shape[:-1] or (1,), -1),
                          img.token_ids.shape[-1]) for img in ctx.images]


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@torch.no_grad()
def test_clip_vectors_reproduce_the_cls_row(family):
    model = tiny_vlm(family)
    x = tiny_inputs(model, family, IMAGES, padding_side="left")
    reader = Reader("projector", Needs(vision_layers=(0,), cls_row=True, queries=True, keys=True, values=True))
    with prunelab.apply(model, reader):
        model(**x)
    for img in reader.seen[0].images:
        q, k, v = img.queries[0], img.keys[0], img.values[0]  # [tiles, H, 1 + P, d], the CLS first
        assert q.shape == k.shape == v.shape and q.shape[2] == img.cls_row[0].shape[-1] + 1
        scale = q.shape[-1] ** -0.5
        row = ((q[:, :, :1] @ k.transpose(-1, -2)) * scale).softmax(-1)[:, :, 0, 1:]  # CLS over the patches
        torch.testing.assert_close(row, img.cls_row[0], atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_qwen_vectors_follow_the_merge_units_and_tower_drops():
    model = tiny_vlm("qwen2_5_vl")
    x = tiny_inputs(model, "qwen2_5_vl", IMAGES, padding_side="left")
    reader = Reader("projector", Needs(vision_layers=(0, 3), keys=True, values=True))
    with prunelab.apply(model, reader):
        model(**x)
    heads = model.config.vision_config.num_heads
    for img in reader.seen[0].images:
        for layer in (0, 3):
            assert img.keys[layer].shape[:3] == (heads, img.span.num_tokens, 4)
            assert bool((img.values[layer].abs().sum(-1) > 0).all())


@torch.no_grad()
def test_llm_keys_and_values_are_the_cache_rows():
    model = tiny_vlm("llava")
    x = tiny_inputs(model, "llava", IMAGES, padding_side="left")
    reader = Reader("llm", Needs(llm_kv=True), layer=1)
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.get_text_config())
    with prunelab.apply(model, reader) as h:
        model(**x, past_key_values=cache, use_cache=True)
    prompt = h.state.prompt
    for img in reader.seen[0].images:
        b = img.span.sample
        rows = [int(((prompt.index[b] == p) & prompt.valid[b]).nonzero()) for p in img.span.positions.tolist()]
        keys, values = img.kv
        torch.testing.assert_close(keys, cache.layers[1].keys[b][:, rows])
        torch.testing.assert_close(values, cache.layers[1].values[b][:, rows])


@torch.no_grad()
def test_image_query_rows_are_the_models_attention():
    model = tiny_vlm("llava")
    x = tiny_inputs(model, "llava", IMAGES, padding_side="left")
    reader = Reader("llm", Needs(rows=("image",)), layer=0)
    with prunelab.apply(model, reader):
        model(**x)
    attn = eager_attentions(model, x)[0]
    for img in reader.seen[0].images:
        b, cols = img.span.sample, img.span.positions
        expected = attn[b][:, cols][:, :, cols]  # this image's queries over its own tokens
        torch.testing.assert_close(img.rows["image"], expected, atol=1e-5, rtol=1e-4)


def test_llm_reads_are_refused_elsewhere():
    with pytest.raises(ValueError, match="rows"):
        Stage("projector", lambda ctx: [], needs=Needs(llm_kv=True))


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@torch.no_grad()
def test_image_mean_is_the_image_rows_averaged_without_the_block(family):
    """``image_mean`` (the image_query_received kernel) equals the ``image`` rows averaged over heads and queries."""
    model = tiny_vlm(family)
    x = tiny_inputs(model, family, IMAGES, padding_side="left")
    reader = Reader("llm", Needs(rows=("image", "image_mean")), layer=0)
    with prunelab.apply(model, reader):
        model(**x)
    for img in reader.seen[0].images:
        torch.testing.assert_close(img.rows["image_mean"], img.rows["image"].float().mean((0, 1)), atol=1e-6,
                                   rtol=1e-5)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@torch.no_grad()
def test_next_layer_reads_are_the_next_layers_own(family):
    """``Needs(next_layer=True)`` after layer 0 reads what layer 1's own attention reads (nothing dropped in
    between: layer 1 runs on layer 0's output), computed by a look-ahead call that leaves the forward and the cache
    as they were."""
    model = tiny_vlm(family)
    x = tiny_inputs(model, family, IMAGES, padding_side="left")
    dense = model(**x).logits
    needs = dict(rows=("image", "image_mean", "last"), llm_kv=True)
    ahead = Reader("llm", Needs(**needs, next_layer=True), layer=0)
    own = Reader("llm", Needs(**needs), layer=1)
    with prunelab.apply(model, ahead):
        torch.testing.assert_close(model(**x).logits, dense, atol=1e-5, rtol=0)
    with prunelab.apply(model, own):
        model(**x)
    for a, b in zip(ahead.seen[0].images, own.seen[0].images):
        for q in needs["rows"]:
            torch.testing.assert_close(a.rows[q], b.rows[q], atol=1e-6, rtol=1e-5)
        for u, v in zip(a.kv, b.kv):
            torch.testing.assert_close(u, v, atol=1e-6, rtol=1e-5)
    both = VLMPlan(ahead.vlm_plan().stages + own.vlm_plan().stages)  # a look-ahead into a layer that also observes
    ahead.seen.clear()
    own.seen.clear()
    with prunelab.apply(model, type("Both", (), {"vlm_plan": lambda self: both})()):
        model(**x)
    assert len(ahead.seen) == len(own.seen) == 1
    torch.testing.assert_close(ahead.seen[0].images[0].kv[0], own.seen[0].images[0].kv[0], atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_bidirectional_rows_see_every_valid_key():
    """``causal=False``: the image queries' rows (torch) see the later image keys too, and their mean equals the
    kernel's column means computed without the causal mask."""
    model = tiny_vlm("llava")
    x = tiny_inputs(model, "llava", IMAGES, padding_side="left")
    reader = Reader("llm", Needs(rows=("image", "image_mean"), causal=False), layer=0)
    causal = Reader("llm", Needs(rows=("image",)), layer=0)
    for r in (reader, causal):
        with prunelab.apply(model, r):
            model(**x)
    for img, ref in zip(reader.seen[0].images, causal.seen[0].images):
        rows = img.rows["image"]  # [H, n, n]: each image query's probabilities over the image columns
        upper = torch.ones_like(rows[0], dtype=torch.bool).triu(1)
        assert bool((rows[:, upper] > 0).all()) and bool((ref.rows["image"][:, upper] == 0).all())
        torch.testing.assert_close(img.rows["image_mean"], rows.float().mean((0, 1)), atol=1e-6, rtol=1e-5)


def test_renumbering_is_refused_where_it_has_no_meaning():
    keep = Reader("llm", Needs(), layer=0).select
    with pytest.raises(ValueError, match="renumber"):
        Stage("projector", keep, renumber=True)
    with pytest.raises(ValueError, match="renumber"):
        VLMPlan((Stage("llm", keep, layer=0, renumber=True), Stage("llm", keep, layer=1, reactivate=True)))
    model = tiny_vlm("qwen2_5_vl")
    plan = VLMPlan((Stage("llm", keep, layer=0, renumber=True),))
    with pytest.raises(ValueError, match="renumber"):
        prunelab.apply(model, type("Renumber", (), {"vlm_plan": lambda self: plan})())
    for bad in ("yes", 1):
        with pytest.raises(ValueError, match="next_layer"):
            Needs(next_layer=bad)
        with pytest.raises(ValueError, match="causal"):
            Needs(causal=bad)
