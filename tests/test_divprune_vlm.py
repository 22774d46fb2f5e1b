"""DivPrune through the VLM seam on tiny random LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL models."""

from __future__ import annotations

import pytest
import torch
from vlm_helpers import generate_tail

import prunelab
from prunelab.common.handle import UnsupportedModelError
from prunelab.common.tiny_vlm import sample_inputs, tiny_inputs, tiny_vlm
from prunelab.common.tokens import keep_count
from prunelab.common.vlm import install_vlm
from prunelab.common.vlm_layout import find_image_spans
from prunelab.methods.divprune import DivPrune, divprune_keep_count, max_min_diversity

RAGGED = [1, 2]






@torch.no_grad()
def _dense_image_embeds(model, family, x):
    """Per image, its rows of the dense run's ``inputs_embeds`` (the projected embeddings), captured by our own
    pre-hook on the language model, split at the image-token positions of ``input_ids``."""
    seen = {}

    def grab(_m, _a, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].clone()

    h = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**x)
    finally:
        h.remove()
    spans = find_image_spans(model, family, x["input_ids"], x["attention_mask"], x.get("image_sizes"),
                             x.get("image_grid_thw"))
    is_img = (x["input_ids"] == model.config.image_token_id) & x["attention_mask"].bool()
    out = []
    for b in range(x["input_ids"].shape[0]):
        rows = seen["embeds"][b, is_img[b]]
        sizes = [s.num_tokens for s in spans if s.sample == b]
        out += list(rows.split(sizes))
    return out


def test_keep_all_is_dense(family_model):
    family, model = family_model
    x = tiny_inputs(model, family, RAGGED, padding_side="left")
    with torch.no_grad():
        dense = model(**x).logits
        with prunelab.apply(model, DivPrune(budget=1.0)) as h:
            kept = model(**x).logits
    torch.testing.assert_close(kept, dense, atol=1e-5, rtol=0)
    assert all(torch.equal(k, torch.arange(k.numel())) for k in h.state.kept)


@pytest.mark.parametrize("budget", [0.3, 3])
def test_kept_set_is_max_min_diversity(family_model, budget):
    family, model = family_model
    x = tiny_inputs(model, family, RAGGED, padding_side="right")
    images = _dense_image_embeds(model, family, x)
    method = DivPrune(budget=budget)
    with torch.no_grad(), install_vlm(model, method) as h:
        model(**x)
    assert len(h.state.kept) == len(images) == 3
    for emb, kept in zip(images, h.state.kept):
        M = emb.shape[0]  # NeXT: base tile + unpadded crops + image_newline tokens (official code)
        k = budget if isinstance(budget, int) else int(round(budget * M))
        assert kept.dtype == torch.int64 and kept.numel() == k
        assert bool((kept[1:] > kept[:-1]).all())
        assert torch.equal(kept, max_min_diversity(emb[None], k)[0])
    if family == "llava_next":  # the newlines are candidates: M counts them
        spans = find_image_spans(model, family, x["input_ids"], x["attention_mask"], x["image_sizes"])
        assert all(s.newline.any() and s.num_tokens == e.shape[0] for s, e in zip(spans, images))
    # text untouched: every valid non-image token is kept, in order
    tok = model.config.image_token_id
    for b in range(2):
        pos = h.state.positions[b][h.state.positions[b] >= 0]
        ids, valid = x["input_ids"][b], x["attention_mask"][b].bool()
        assert torch.equal(pos[ids[pos] != tok], ((ids != tok) & valid).nonzero().flatten())
        assert int((ids[pos] == tok).sum()) == sum(k.numel() for k, s in zip(h.state.kept, spans_of(h)) if s == b)


def spans_of(handle):
    return [s.sample for s in handle.state.prompt.spans]


@pytest.mark.parametrize("side", ["left", "right"])
def test_generate_batch_matches_per_sample(family_model, side):
    family, model = family_model
    x = tiny_inputs(model, family, RAGGED, padding_side=side)
    with prunelab.apply(model, DivPrune(budget=0.3)):
        batch = generate_tail(model, x)
        singles = torch.cat([generate_tail(model, sample_inputs(x, b, RAGGED)) for b in range(2)])
        pruned_last = model(**x).logits[:, -1]
    assert torch.equal(batch, singles)
    with torch.no_grad():  # pruning changes what the language model sees
        assert not torch.allclose(pruned_last, model(**x).logits[:, -1], atol=1e-3)


def test_budget_rules():
    assert divprune_keep_count(576, 0.098) == 56  # official SUBSET_RATIO 0.098: ~56 of 576
    assert divprune_keep_count(25, 0.1) == 2 and keep_count(25, 0.1) == 3  # half to even vs half up
    assert divprune_keep_count(25, 0.1, "half_up") == 3 and DivPrune(0.1, rounding="half_up").keep_for(25) == 3
    assert divprune_keep_count(4, 0.098) == 1  # the official int(round(0.39)) = 0 would keep nothing
    assert [DivPrune.llava15(t).keep_for(576) for t in (64, 128, 192)] == [64, 128, 192]
    assert DivPrune().budget == 0.098 and DivPrune().official_quirks is False


def test_official_quirks_through_the_seam():
    model = tiny_vlm("llava")
    x = tiny_inputs(model, "llava", RAGGED)
    images = _dense_image_embeds(model, "llava", x)
    with torch.no_grad(), install_vlm(model, DivPrune(budget=5, official_quirks=True)) as h:
        model(**x)
    for emb, kept in zip(images, h.state.kept):
        assert torch.equal(kept, max_min_diversity(emb[None], 5, official_quirks=True)[0])


def test_bad_inputs(family_model):
    family, model = family_model
    for kwargs, name in ((dict(budget=0), "budget"), (dict(budget=1.5), "budget"), (dict(budget=True), "budget"),
                         (dict(rounding="floor"), "rounding"), (dict(official_quirks=1), "official_quirks"),
                         (dict(impl="cuda"), "impl")):
        with pytest.raises(ValueError, match=name):
            DivPrune(**kwargs)
    with pytest.raises(ValueError, match="tokens"):
        DivPrune.llava15(100)
    x = tiny_inputs(model, family, RAGGED)
    with install_vlm(model, DivPrune(budget=10_000)), pytest.raises(ValueError, match="budget: 10000"):
        model(**x)
    text = tiny_inputs(model, family, [0, 0])
    with install_vlm(model, DivPrune()), pytest.raises(ValueError, match="input_ids: no image token|pixel_values"):
        model(**text)


def test_unsupported_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match="model:"):
        install_vlm(llama, DivPrune())
    with pytest.raises(TypeError, match="method: DivPrune"):  # apply() routes a text model to the decoder seam
        prunelab.apply(llama, DivPrune())
