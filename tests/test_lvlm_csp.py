"""LVLM_CSP (methods/lvlm_csp/README.md): the selectors on hand-made inputs, the scatter modes on a toy example, the
image tokens per layer against the FLOPs identity, the [SEG] row against eager attention, batches with different
[SEG] positions against single prompts, bad inputs. The shared invariants run in tests/test_invariants.py."""

from __future__ import annotations

import pytest
import torch
from vlm_helpers import eager_attentions, generate_tail, tiny_sam

import prunelab
from prunelab.common.tiny_vlm import sample_inputs, tiny_inputs
from prunelab.common.tokens import topk_sorted
from prunelab.methods.lvlm_csp import (
    LVLMCSP,
    assign,
    cls_attention,
    mean_image_tokens,
    random_tokens,
    scatter,
    seg_first,
    uniform,
)

SEG = 101  # a text id of the tiny vocabulary that tiny_inputs never draws (it draws 1..99)
IMAGES = [1, 2]
TINY = {"scatter_layer": 1, "prune_layer": 2}


def _with_seg(x: dict) -> dict:
    """``x`` with one [SEG] per prompt, at different distances from the end (prompt b: position L - 1 - b)."""
    x = dict(x)
    ids = x["input_ids"].clone()
    for b in range(ids.shape[0]):
        ids[b, ids.shape[1] - 1 - b] = SEG
    x["input_ids"] = ids
    return x


# -- selectors and scattering by hand ------------------------------------------------------------------------------
def test_uniform_and_random_selectors():
    assert uniform(576, 64).tolist() == [9 * i for i in range(64)]
    assert uniform(10, 3).tolist() == [0, 3, 6] and uniform(5, 5).tolist() == [0, 1, 2, 3, 4]
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    r = random_tokens(50, 7, g())
    assert r.tolist() == sorted(set(r.tolist())) and r.numel() == 7 and torch.equal(r, random_tokens(50, 7, g()))
    for bad in (0, 11):
        with pytest.raises(ValueError, match="clusters"):
            uniform(10, bad)


def test_cls_selector_takes_the_head_mean_top_k():
    row = torch.tensor([[0.1, 0.5, 0.2, 0.2], [0.3, 0.1, 0.4, 0.2]])  # means 0.2, 0.3, 0.3, 0.2
    assert cls_attention(row, 2).tolist() == [1, 2] and cls_attention(row, 3).tolist() == [0, 1, 2]  # ties: lower


def test_seg_first_allocates_by_area_from_each_instance_only():
    N = 20
    masks = torch.zeros(3, N, dtype=torch.bool)
    masks[0, :10] = True  # area 10
    masks[1, 10:14] = True  # area 4
    masks[2, 14:16] = True  # area 2
    picks = seg_first(masks, 8)  # 8 * 10/16 = 5, 8 * 4/16 = 2, 8 * 2/16 = 1
    assert picks.tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    assert not bool(torch.isin(picks, torch.arange(16, N)).any())  # background tokens are never representatives
    tiny = torch.zeros(5, N, dtype=torch.bool)
    for o in range(5):
        tiny[o, 4 * o] = True
    assert seg_first(tiny, 3).numel() == 5  # more instances than N_c: one each, the total exceeds N_c
    with pytest.raises(ValueError, match="instances"):
        seg_first(torch.zeros(2, N, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="instances"):
        seg_first(torch.ones(2, N), 4)


def test_scatter_modes_on_a_toy_example():
    inputs = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [1.0, 0.05]])
    reps = torch.tensor([0, 2])
    members = assign(inputs, reps)
    assert members.tolist() == [0, 0, 1, 1, 0]
    hidden = torch.tensor([[5.0, 5.0], [-1.0, 2.0]])  # the representatives' states at the scattering layer
    copy = scatter("copy_rep_state", inputs, hidden, reps, members)
    assert torch.equal(copy, hidden[members])  # members equal their representative's state
    delta = scatter("add_rep_delta", inputs, hidden, reps, members)
    expected = inputs + (hidden - inputs[reps])[members]
    assert torch.allclose(delta, expected) and torch.equal(delta[reps], hidden)
    again = scatter("reembed", inputs, hidden, reps, members)
    assert torch.equal(again[[1, 3, 4]], inputs[[1, 3, 4]]) and torch.equal(again[reps], hidden)
    with pytest.raises(ValueError, match="scatter_mode"):
        scatter("copy", inputs, hidden, reps, members)


def test_flops_identity():
    # 32 layers, 256 tokens: N_c = 32 in layers 0..7, all in 8..15, N_keep = 32 from 16 on: 88 tokens a layer
    assert mean_image_tokens(256, 32, 32, 8, 16, 32) == 88.0
    assert 1 - mean_image_tokens(256, 32, 16, 8, 16, 32) / 256 == pytest.approx(0.6875)
    assert mean_image_tokens(256, 256, 256, 8, 16, 32) == 256


# -- on the models -------------------------------------------------------------------------------------------------
def _rows_per_layer(model, x, method):
    """Image rows each language-model layer ran on, per prompt, at prefill."""
    layers = model.model.language_model.layers
    seen = [None] * len(layers)

    def record(i):
        return lambda m, a, k: seen.__setitem__(i, (a[0] if a else k["hidden_states"]).shape[1])

    with prunelab.apply(model, method) as h:
        hooks = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            model(**x)
        finally:
            for hook in hooks:
                hook.remove()
    return seen, h


@pytest.mark.parametrize("selector", ["uniform", "random"])
@torch.no_grad()
def test_image_tokens_per_layer_follow_the_profile(family_model, selector):
    family, model = family_model
    x = _with_seg(tiny_inputs(model, family, [1], padding_side="left"))  # one prompt, one image
    dense_rows = x["input_ids"].shape[1]
    method = LVLMCSP.for_model(model, clusters=0.25, keep=0.5, selector=selector, seg_token_id=SEG, **TINY)
    seen, h = _rows_per_layer(model, x, method)
    n = h.state.images[0].span.num_tokens
    n_c, n_keep = [k.numel() for _, (k,) in h.state.history][0], max(1, int(n * 0.5 + 0.5))
    counts = [rows - (dense_rows - n) for rows in seen]  # image rows of each layer
    assert counts == [n_c, n, n_keep]  # layer 0: representatives; layer 1: every token; layer 2: the kept
    assert sum(counts) / 3 == mean_image_tokens(n, n_c, n_keep, 1, 2, 3)
    names = [name for name, _ in h.state.history]
    assert names == ["LVLM_CSP clustering", "LVLM_CSP scattering", "LVLM_CSP pruning"]
    assert torch.equal(h.state.history[1][1][0], torch.arange(n))  # all N tokens back, at their own span slots


@torch.no_grad()
def test_pruning_keeps_the_top_of_the_seg_row_as_eager_attention_gives_it(family_model):
    family, model = family_model
    x = _with_seg(tiny_inputs(model, family, IMAGES, padding_side="left"))
    method = LVLMCSP.for_model(model, clusters=1.0, keep=0.25, seg_token_id=SEG, **TINY)  # layers 0-1 see all
    with prunelab.apply(model, method) as h:
        model(**x)
    kept = h.state.history[-1][1]
    attn = eager_attentions(model, x)[1]  # layer L2 - 1 = 1: [B, H, L, L]
    for img, k in zip(h.state.images, kept):
        b, cols = img.span.sample, img.span.positions
        seg_rows = (x["input_ids"][b] == SEG).nonzero().flatten()
        scores = attn[b][:, seg_rows][:, :, cols].mean((0, 1))
        assert torch.equal(k, topk_sorted(scores, max(1, int(0.25 * cols.numel() + 0.5))))


@pytest.mark.parametrize("mode", ["reembed", "copy_rep_state", "add_rep_delta"])
@torch.no_grad()
def test_batch_with_different_seg_positions_equals_each_prompt_alone(family_model, mode):
    family, model = family_model
    x = _with_seg(tiny_inputs(model, family, IMAGES, padding_side="left"))
    method = LVLMCSP.for_model(model, clusters=0.5, keep=0.25, scatter_mode=mode, selector="random",
                               seg_token_id=SEG, **TINY)
    with prunelab.apply(model, method) as h:
        batch = generate_tail(model, x, n=3)
        kept = [[k.clone() for k in ks] for _, ks in h.state.history]
        alone = []
        for b in range(len(IMAGES)):
            single = sample_inputs(x, b, IMAGES)
            alone.append(generate_tail(model, single, n=3))
            first = sum(IMAGES[:b])
            for stage, (_, ks) in zip(kept, h.state.history):
                assert all(torch.equal(u, v) for u, v in zip(stage[first:first + IMAGES[b]], ks))
    assert torch.equal(batch, torch.cat(alone))


@torch.no_grad()
def test_scatter_modes_change_what_the_returning_tokens_carry(family_model):
    family, model = family_model
    x = _with_seg(tiny_inputs(model, family, IMAGES, padding_side="left"))
    outs = {}
    for mode in ("reembed", "copy_rep_state", "add_rep_delta"):
        with prunelab.apply(model, LVLMCSP.for_model(model, clusters=0.5, keep=1.0, scatter_mode=mode,
                                                     seg_token_id=SEG, **TINY)):
            outs[mode] = model(**x).logits[:, -1]
    assert not torch.allclose(outs["reembed"], outs["copy_rep_state"], atol=1e-5)
    assert not torch.allclose(outs["reembed"], outs["add_rep_delta"], atol=1e-5)


@torch.no_grad()
def test_cls_selector_reads_the_towers_cls_row():
    from prunelab.common.tiny_vlm import tiny_vlm

    model = tiny_vlm("llava")
    x = _with_seg(tiny_inputs(model, "llava", [1], padding_side="left"))
    with prunelab.apply(model, LVLMCSP.for_model(model, clusters=4, keep=4, selector="cls", seg_token_id=SEG,
                                                 **TINY)) as h:
        model(**x)
    tower = model.model.vision_tower
    previous = tower.config._attn_implementation
    tower.config._attn_implementation_internal = "eager"
    try:
        out = tower(x["pixel_values"], output_attentions=True, output_hidden_states=True)
    finally:
        tower.config._attn_implementation_internal = previous
    layer = model.config.vision_feature_layer % (len(out.attentions) + 1) - 1
    row = out.attentions[layer][0, :, 0, 1:]  # the CLS query over the patches, per head
    assert torch.equal(h.state.history[0][1][0], topk_sorted(row.mean(0), 4))
    qwen = __import__("prunelab.common.tiny_vlm", fromlist=["tiny_vlm"]).tiny_vlm("qwen2_5_vl")
    with pytest.raises(ValueError, match="selector"):
        LVLMCSP.for_model(qwen, selector="cls", **TINY)


@torch.no_grad()
def test_seg_first_on_the_model_and_a_missing_seg_token(family_model):
    family, model = family_model
    x = _with_seg(tiny_inputs(model, family, IMAGES, padding_side="left"))

    def halves(img):  # two "instances": the first quarter and the third quarter of the image's tokens
        n = img.embeds.shape[0]
        m = torch.zeros(2, n, dtype=torch.bool)
        m[0, : n // 4] = True
        m[1, n // 2: 3 * n // 4] = True
        return m

    method = LVLMCSP.for_model(model, clusters=0.5, keep=0.5, selector="seg_first", instances=halves,
                               seg_token_id=SEG, **TINY)
    with prunelab.apply(model, method) as h:
        model(**x)
    for img, reps in zip(h.state.images, h.state.history[0][1]):
        n = img.span.num_tokens
        inside = (reps < n // 4) | ((reps >= n // 2) & (reps < 3 * n // 4))
        assert bool(inside.all()) and reps.numel() >= 2
    with pytest.raises(ValueError, match="seg_token_id"), prunelab.apply(model, LVLMCSP.for_model(
            model, clusters=0.5, keep=0.5, seg_token_id=SEG + 1, **TINY)):
        model(**x)


# -- the LISA-style segmenter --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lisa():
    from prunelab.common.tiny_vlm import tiny_vlm
    from prunelab.methods.lvlm_csp.lisa import LisaSegmenter

    torch.manual_seed(1)
    return LisaSegmenter(tiny_vlm("llava"), tiny_sam(), SEG).eval()


@torch.no_grad()
def test_lisa_masks_under_lvlm_csp(lisa):
    x = _with_seg(tiny_inputs(lisa.vlm, "llava", IMAGES, padding_side="left"))
    start = int(x["attention_mask"][0].nonzero()[0])
    x["input_ids"][0, start + 1] = SEG  # prompt 0 holds two [SEG] tokens (one in its text before the image): two masks
    sam_pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    dense = lisa(**x, sam_pixel_values=sam_pixels)
    assert [m.shape for m in dense.masks] == [(2, 32, 32), (1, 32, 32)]  # SAM's decoder: 4x its 8 x 8 grid
    with prunelab.apply(lisa.vlm, LVLMCSP.for_model(lisa.vlm, clusters=1.0, keep=1.0, seg_token_id=SEG, **TINY)):
        same = lisa(**x, sam_pixel_values=sam_pixels)
    for a, b in zip(same.masks + same.seg_states, dense.masks + dense.seg_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # keep-all: the dense [SEG] states and masks
    method = LVLMCSP.for_model(lisa.vlm, clusters=0.5, keep=0.25, seg_token_id=SEG, **TINY)
    with prunelab.apply(lisa.vlm, method):
        pruned = lisa(**x, sam_pixel_values=sam_pixels)
        embeds = lisa.sam.get_image_embeddings(sam_pixels)
        singles = [lisa(**sample_inputs(x, b, IMAGES), image_embeddings=embeds[b:b + 1]) for b in range(2)]
    assert [m.shape for m in pruned.masks] == [m.shape for m in dense.masks]
    assert not torch.allclose(pruned.seg_states[0], dense.seg_states[0], atol=1e-4)  # pruning reaches [SEG] ...
    assert not torch.equal(pruned.masks[0], dense.masks[0])  # ... and the masks (a random SAM's logits are ~1e-5)
    for b, single in enumerate(singles):  # a batch with [SEG] at different rows equals each prompt alone
        torch.testing.assert_close(pruned.masks[b], single.masks[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="input_ids"):
        lisa(**tiny_inputs(lisa.vlm, "llava", IMAGES), sam_pixel_values=sam_pixels)
    with pytest.raises(ValueError, match="sam_pixel_values"):
        lisa(**x)


# -- the one-stage baseline ----------------------------------------------------------------------------------------
@torch.no_grad()
def test_seg_prune_is_lvlm_csp_pruning_alone():
    from prunelab.common.tiny_vlm import tiny_vlm
    from prunelab.methods.lvlm_csp import SegPrune

    model = tiny_vlm("llava")
    x = _with_seg(tiny_inputs(model, "llava", IMAGES, padding_side="left"))
    dense = model(**x).logits
    with prunelab.apply(model, SegPrune(keep=1.0, layer=1, seg_token_id=SEG)):
        torch.testing.assert_close(model(**x).logits, dense, atol=1e-5, rtol=1e-5)  # keep-all: the dense model
    with prunelab.apply(model, SegPrune(keep=0.25, layer=2, seg_token_id=SEG)) as h:
        one = model(**x).logits
        kept = [k.clone() for k in h.state.history[-1][1]]
    # LVLM_CSP with every token a representative: no clustering, a scattering that changes nothing, the same pruning
    csp = LVLMCSP.for_model(model, clusters=1.0, keep=0.25, seg_token_id=SEG, **TINY)
    with prunelab.apply(model, csp) as h:
        torch.testing.assert_close(model(**x).logits, one, atol=1e-5, rtol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(h.state.history[-1][1], kept))
    for bad, name in (({"keep": 0}, "keep"), ({"layer": 0}, "layer"), ({"seg_token_id": -2}, "seg_token_id")):
        with pytest.raises(ValueError, match=name):
            SegPrune(**bad)
    with pytest.raises(ValueError, match="layer"), prunelab.apply(model, SegPrune(layer=3)):
        model(**x)


@torch.no_grad()
def test_lisa_reads_the_state_that_emits_seg_by_default(lisa):
    from prunelab.methods.lvlm_csp.lisa import LisaSegmenter

    x = _with_seg(tiny_inputs(lisa.vlm, "llava", IMAGES, padding_side="left"))
    sam_pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    last = lisa.vlm(**x, output_hidden_states=True).hidden_states[-1]
    at = [int((x["input_ids"][b] == SEG).nonzero()) for b in range(2)]
    emitting = lisa(**x, sam_pixel_values=sam_pixels).seg_states  # LISA's: the row before [SEG]
    own = LisaSegmenter(lisa.vlm, lisa.sam, SEG, seg_state="own")(**x, sam_pixel_values=sam_pixels).seg_states
    for b in range(2):
        torch.testing.assert_close(emitting[b][0], last[b, at[b] - 1])
        torch.testing.assert_close(own[b][0], last[b, at[b]])
    start = int(x["attention_mask"][0].nonzero()[0])
    x["input_ids"][0, start] = SEG  # a [SEG] first in its prompt: no row emits it
    with pytest.raises(ValueError, match="seg_state"):
        lisa(**x, sam_pixel_values=sam_pixels)
    with pytest.raises(ValueError, match="seg_state"):
        LisaSegmenter(lisa.vlm, lisa.sam, SEG, seg_state="previous")
