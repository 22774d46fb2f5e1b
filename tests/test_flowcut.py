"""FlowCut (methods/flowcut/README.md): its scores, the prune schedule inside the encoder, the LLM cut, batches.
The invariants every method shares (keep-all, apply twice, remove, batch = per sample, bad inputs) run in
tests/test_invariants.py."""

from __future__ import annotations

import math

import pytest
import torch
from vlm_helpers import generate_tail

import prunelab
from prunelab.common.tiny_vlm import (
    QWEN_IMAGE_TOKEN,
    QWEN_VISION_END,
    QWEN_VISION_START,
    photo_llava,
    sample_inputs,
    tiny_inputs,
    tiny_vlm,
)
from prunelab.methods.flowcut import FlowCut, scores


def test_entropy_rule_on_a_uniform_and_a_one_hot_row():
    n, target = 40, 8
    uniform, one_hot = torch.ones(1, n), torch.zeros(1, n)
    one_hot[0, 3] = 1
    assert float(scores.entropy_ratio(uniform)[0]) == pytest.approx(1.0)
    assert float(scores.entropy_ratio(one_hot)[0]) == pytest.approx(0.0)  # no NaN on the exact zeros
    for remaining in (2, 4, 8):
        assert scores.prune_count(n, target, remaining, 1.0) == 0
        assert scores.prune_count(n, target, remaining, 0.0) == round((n - target) / math.sqrt(remaining))
    assert scores.prune_count(n, target, 0, 0.5) == n - target  # the final cut lands on the target
    assert scores.prune_count(target, target, 2, 0.0) == 0


def test_ema_has_its_closed_form():
    layers = [torch.full((1, 3), float(v)) for v in (4.0, 2.0, 8.0, 6.0)]
    c = None
    for s in layers:
        c = scores.ema(c, s, 0.5)
    expected = 0.125 * 4 + 0.125 * 2 + 0.25 * 8 + 0.5 * 6  # 0.5^(L-1) for the first, 0.5^(L-l) after
    assert torch.allclose(c, torch.full((1, 3), expected))


def test_layer_score_combines_the_normalised_terms_with_the_density():
    a, s, rho = torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 2.0]]), torch.tensor([[2.0, 1.0]])
    assert torch.allclose(scores.layer_score(a, s, rho), torch.tensor([[(0.25 + 0.5) * 2, (0.75 + 0.5) * 1]]))
    values = torch.randn(2, 3, 5, 4)  # [tiles, H, 1 + n, d]
    sem = scores.semantic(values)
    assert sem.shape == (2, 4) and bool((sem > 0).all()) and bool((sem.sum(-1) < 1).all())  # the CLS share is cut
    assert scores.semantic(values, "cosine").shape == (2, 4)
    assert torch.allclose(scores.density(values), values[:, :, 1:].mean(1).abs().sum(-1))


def _counts(history, name_prefix="FlowCut encoder"):
    return [(int(name.split()[-1]), [k.numel() for k in kept]) for name, kept in history
            if name.startswith(name_prefix)]


@torch.no_grad()
def test_schedule_prunes_only_at_even_counters_and_lands_on_the_target():
    model = photo_llava(image_size=64, patch_size=8, vision_layers=8)  # 64 patches, feature layer 6
    x = tiny_inputs(model, "llava", [1, 2], padding_side="left")
    method = FlowCut.for_model(model, budget=8)
    assert method.feature_layer == 6
    with prunelab.apply(model, method) as h:
        model(**x)
        history = _counts(h.state.history)
    assert [layer for layer, _ in history] == list(range(6))
    previous = [64] * 3
    for layer, counts in history:
        remaining = method.feature_layer - layer - 1
        assert all(c <= p for c, p in zip(counts, previous))  # never grows
        if remaining % 2:
            assert counts == previous  # odd counters never prune
        previous = counts
    assert previous == [8, 8, 8]  # exactly T after the last cut, before the feature layer runs


@torch.no_grad()
def test_images_keep_their_own_counts_and_batch_equals_each_prompt_alone():
    model = photo_llava(image_size=64, patch_size=8, vision_layers=8)
    x = tiny_inputs(model, "llava", [1, 2], padding_side="left")
    method = FlowCut.for_model(model, budget=8)
    with prunelab.apply(model, method) as h:
        batch = generate_tail(model, x, n=3)
        counts = _counts(h.state.history)
        singles = torch.cat([generate_tail(model, sample_inputs(x, b, [1, 2]), n=3) for b in range(2)])
    assert torch.equal(batch, singles)
    quirky = FlowCut.for_model(model, budget=8, official_quirks=True)
    with prunelab.apply(model, quirky) as h:
        model(**x)
        official = _counts(h.state.history)
    assert all(len(set(c)) == 1 for _, c in official)  # one count for the whole batch
    assert any(len(set(c)) > 1 for _, c in counts) or counts == official


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
@torch.no_grad()
def test_the_llm_cut_keeps_the_target_per_image(family):
    model = tiny_vlm(family)
    x = tiny_inputs(model, family, [1, 2], padding_side="left")
    method = FlowCut.for_model(model, budget=0.25)
    with prunelab.apply(model, method) as h:
        model(**x)
    name, kept = h.state.history[-1]
    assert name == "FlowCut LLM 1"
    for img, k in zip(h.state.images, kept):
        span = img.span
        tokens = span.num_tokens - (0 if span.newline is None else int(span.newline.sum()))
        assert k.numel() == method.target(tokens)
        if span.newline is not None:
            assert not bool(span.newline[k].any())  # the cut leaves no newline token


def test_a_plan_needs_the_model():
    with pytest.raises(ValueError, match="feature_layer"):
        FlowCut(budget=64).vlm_plan()
    with pytest.raises(ValueError, match="semantic"):
        FlowCut(semantic="dot")


def _one_window_qwen():
    """The tiny Qwen2.5-VL with one attention window over a whole image and full attention at every block: its
    tower then runs as Qwen2-VL's, the tower the official FlowCut Qwen code patches."""
    model = tiny_vlm("qwen2_5_vl")
    for cfg in {id(c): c for c in (model.config.vision_config, model.model.visual.config)}.values():
        cfg.window_size, cfg.fullatt_block_indexes = 64, [0, 1, 2, 3]
    model.model.visual.window_size, model.model.visual.fullatt_block_indexes = 64, [0, 1, 2, 3]
    return model


def _qwen_prompt(model, grid=(8, 8), before=3, after=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = model.config.vision_config.spatial_merge_size
    units = grid[0] * grid[1] // (m * m)
    ids = (torch.randint(1, 100, (before,), generator=g).tolist() + [QWEN_VISION_START]
           + [QWEN_IMAGE_TOKEN] * units + [QWEN_VISION_END] + torch.randint(1, 100, (after,), generator=g).tolist())
    v = model.config.vision_config
    dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    input_ids = torch.tensor([ids])
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                pixel_values=torch.randn(grid[0] * grid[1], dim, generator=g),
                image_grid_thw=torch.tensor([[1, *grid]]), mm_token_type_ids=(input_ids == QWEN_IMAGE_TOKEN).long())


def _official_qwen_tower(model, x, T: int) -> tuple[torch.Tensor, list[int]]:
    """The official FlowCut Qwen tower loop, written out here: ``8T`` patches kept, chosen patch by patch, then the
    merger on the kept patches in their original order. Returns the merged tokens and the patch count per block."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    tower, seen = model.model.visual, {}
    hook = tower.blocks[0].register_forward_pre_hook(
        lambda _m, a, k: seen.update(h=a[0], pe=k["position_embeddings"]), with_kwargs=True)
    tower(x["pixel_values"], grid_thw=x["image_grid_thw"])
    hook.remove()
    h, (cos, sin), target = seen["h"], seen["pe"], 4 * 2 * T
    cumulative, counts = None, []
    for idx, blk in enumerate(tower.blocks):
        n = h.shape[0]
        q, k, v = blk.attn.qkv(blk.norm1(h)).reshape(n, 3, blk.attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, n, d]
        h = blk(h, cu_seqlens=torch.tensor([0, n], dtype=torch.int32), position_embeddings=(cos, sin))
        if n > target:
            remaining = len(tower.blocks) - idx - 1
            attn = ((q.mean(1, keepdim=True) @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])).softmax(-1).mean(0)
            score = (attn * v.mean(0).abs().sum(-1))[0]
            cumulative = score if cumulative is None else 0.5 * cumulative + 0.5 * score
            if remaining % 2 == 0:
                entropy = -(attn * torch.log(attn + 1e-7)).sum(-1) / math.log(n)
                drop = int(((n - target) / remaining ** 0.5 * (1 - entropy ** 2)).round()) if remaining else n
                keep = torch.topk(cumulative, max(n - drop, target)).indices.sort().values
                cumulative, h, cos, sin = cumulative[keep], h[keep], cos[keep], sin[keep]
        counts.append(h.shape[0])
    return tower.merger(h), counts


@torch.no_grad()
def test_official_quirks_on_qwen_select_the_official_codes_patches_and_positions():
    model = _one_window_qwen()
    x = _qwen_prompt(model)
    method = FlowCut.for_model(model, budget=0.25, official_quirks=True)  # T = 4 of 16 units: 32 of 64 patches
    reference, counts = _official_qwen_tower(model, x, method.target(16))
    seen, dense = {}, {}
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda _m, _a, k: dense.setdefault("k", dict(k)) and None, with_kwargs=True)
    model(**x)
    hook.remove()
    with prunelab.apply(model, method) as h:
        hook = lm.register_forward_pre_hook(lambda _m, _a, k: seen.setdefault("k", dict(k)) and None, with_kwargs=True)
        model(**x)
        hook.remove()
    names = [name for name, _ in h.state.history]
    assert names[-2:] == ["merger", "FlowCut LLM 1"] and [k.numel() for k in h.state.history[-2][1]] == [8]
    assert counts[-1] == 32 and len(set(counts)) > 1  # pruned before the last block too
    start = int((x["input_ids"][0] == QWEN_IMAGE_TOKEN).nonzero()[0])
    embeds = seen["k"]["inputs_embeds"][0]
    torch.testing.assert_close(embeds[start:start + 8], reference, atol=1e-5, rtol=1e-5)
    pos, full = seen["k"]["position_ids"], dense["k"]["position_ids"]
    torch.testing.assert_close(pos[..., :start + 8], full[..., :start + 8], atol=0, rtol=0)  # the first 2T ids
    torch.testing.assert_close(pos[..., start + 8:], full[..., start + 16:], atol=0, rtol=0)  # text keeps its own
    with prunelab.apply(model, method):  # decoding continues from the text's own ids: greedy = teacher-forced
        tail = generate_tail(model, x, n=3)
        ids = torch.cat([x["input_ids"], tail[:, :-1]], 1)
        forced = model(**{**x, "input_ids": ids, "attention_mask": torch.ones_like(ids),
                          "mm_token_type_ids": (ids == QWEN_IMAGE_TOKEN).long()}).logits
    assert torch.equal(forced[0, -3:].argmax(-1), tail[0])
    method = FlowCut.for_model(model, budget=0.25)
    with prunelab.apply(model, method) as h:  # default: whole merge units, each with its own ids
        model(**x)
    assert [k.numel() for k in h.state.history[-2][1]] == [8] and h.state.history[-2][0] == "FlowCut encoder 3"


@torch.no_grad()
def test_official_quirks_on_qwen_keep_all_batches_and_generate():
    model = tiny_vlm("qwen2_5_vl")  # window attention at blocks 0 and 2
    x = tiny_inputs(model, "qwen2_5_vl", [1, 2], padding_side="left")
    dense = model(**x).logits
    with prunelab.apply(model, FlowCut.for_model(model, budget=1.0, official_quirks=True)):
        torch.testing.assert_close(model(**x).logits, dense, atol=1e-5, rtol=0)
    method = FlowCut.for_model(model, budget=0.25, official_quirks=True)
    with prunelab.apply(model, method) as h:
        out = generate_tail(model, x, n=3)
        merged = dict(h.state.history)["merger"]
        assert torch.equal(out, generate_tail(model, x, n=3))
    units = [img.span.num_tokens for img in h.state.images]
    assert [k.numel() for k in merged] == [2 * method.target(n) for n in units]
    assert all(torch.equal(k, torch.arange(k.numel())) for k in merged)  # the span's first slots


def test_a_patch_stage_must_leave_whole_merge_units():
    from prunelab.common.reduction import Reduction
    from prunelab.common.vlm_plan import Stage, VLMPlan

    model = tiny_vlm("qwen2_5_vl")
    x = tiny_inputs(model, "qwen2_5_vl", [1])

    class Odd:  # keeps 5 patches: the merger cannot join them four at a time
        def vlm_plan(self):
            return VLMPlan((Stage("vision", lambda ctx: [Reduction(img.token_ids[:, :5], img.token_ids.shape[-1])
                                                         for img in ctx.images], layer=3, exact=False,
                                  patches=True),))

    with prunelab.apply(model, Odd()), pytest.raises(ValueError, match="patches"):
        model(**x)
    with pytest.raises(ValueError, match="patches"):
        Stage("llm", lambda ctx: [], layer=1, patches=True)
    with pytest.raises(ValueError, match="patches"):
        VLMPlan((Stage("vision", lambda ctx: [], layer=0, patches=True), Stage("vision", lambda ctx: [], layer=1)))
