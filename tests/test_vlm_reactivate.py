"""Tokens that come back: a reactivating LLM stage chooses among every image token that entered the language model,
also those an earlier LLM stage dropped; the ones it keeps re-enter at the next layer."""

from __future__ import annotations

import pytest
import torch
from vlm_helpers import generate_tail

import prunelab
from prunelab.common.reduction import Reduction
from prunelab.common.tiny_vlm import sample_inputs, tiny_inputs, tiny_vlm
from prunelab.common.vlm import Stage, VLMPlan

IMAGES = [1, 2]


class DropThenReturn:
    """After LLM layer 0 keep the first half of each image; after layer 1 bring every token back (their values:
    the input embeddings, or ``fill`` when given)."""

    def __init__(self, fill: float | None = None):
        self.fill, self.seen = fill, []

    def vlm_plan(self) -> VLMPlan:
        half = Stage("llm", self.first_half, layer=0, budget=lambda img: max(1, img.token_ids.numel() // 2),
                     name="half")
        back = Stage("llm", self.everything, layer=1, name="back", reactivate=True)
        return VLMPlan((half, back))

    def first_half(self, ctx):
        return [Reduction(torch.arange(img.budget)[None], img.token_ids.numel()) for img in ctx.images]

    def everything(self, ctx):
        self.seen.append(ctx)
        for img in ctx.images:
            if self.fill is not None:
                img.embeds[~img.held] = self.fill
        return [Reduction(torch.arange(img.token_ids.numel())[None], img.token_ids.numel()) for img in ctx.images]


def _hook(module, store, pre: bool):
    if pre:
        return module.register_forward_pre_hook(
            lambda m, a, k: store.append(a[0] if a else k["hidden_states"]), with_kwargs=True)
    return module.register_forward_hook(lambda m, a, o: store.append(o[0] if isinstance(o, tuple) else o))


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("fill", [None, 0.0])
@torch.no_grad()
def test_returning_tokens_reenter_the_next_layer(family, fill):
    model = tiny_vlm(family)
    layers = model.model.language_model.layers
    x = tiny_inputs(model, family, IMAGES, padding_side="left")
    out1 = []
    raw = _hook(layers[1], out1, pre=False)  # before the engine's hook: layer 1's own output
    method = DropThenReturn(fill)
    with prunelab.apply(model, method) as h:
        in0, in2 = [], []
        hooks = [_hook(layers[0], in0, pre=True), _hook(layers[2], in2, pre=True)]
        model(**x)
        for hook in hooks:
            hook.remove()
    raw.remove()
    names = [name for name, _ in h.state.history]
    assert names == ["half", "back"]
    prompt, end = h.state.prompt, h.state.positions
    half = dict(zip(range(len(h.state.images)), h.state.history[0][1]))
    layer1_rows = prompt.llm_rows[0]  # rows layer 1 ran on
    for i, img in enumerate(h.state.images):
        b, span = img.span.sample, img.span.positions
        assert torch.equal(h.state.kept[i], h.state.entry[i])  # everything came back
        for token in h.state.entry[i].tolist():
            pos = int(span[token])
            row2 = int((end[b] == pos).nonzero())
            if token in half[i].tolist():  # held: layer 1's output
                row1 = int(((prompt.index.gather(1, layer1_rows.index)[b] == pos) & layer1_rows.valid[b]).nonzero())
                torch.testing.assert_close(in2[0][b, row2], out1[0][b, row1])
            else:  # returned: the input embedding (or what the stage wrote)
                row0 = int(((prompt.index[b] == pos) & prompt.valid[b]).nonzero())
                expected = in0[0][b, row0] if fill is None else torch.full_like(in0[0][b, row0], fill)
                torch.testing.assert_close(in2[0][b, row2], expected)
    assert all(not bool(img.held.all()) for img in method.seen[0].images)


@torch.no_grad()
def test_returning_tokens_under_generate_batch_equals_per_sample():
    model = tiny_vlm("llava")
    x = tiny_inputs(model, "llava", IMAGES, padding_side="left")
    with prunelab.apply(model, DropThenReturn()):
        batch = generate_tail(model, x, n=4)
        singles = torch.cat([generate_tail(model, sample_inputs(x, b, IMAGES), n=4) for b in range(2)])
    assert torch.equal(batch, singles)


def test_reactivation_is_validated():
    with pytest.raises(ValueError, match="reactivate"):
        Stage("projector", lambda ctx: [], reactivate=True)
    back = Stage("llm", lambda ctx: [], layer=1, reactivate=True)
    with pytest.raises(ValueError, match="reactivate"):
        VLMPlan((back, Stage("llm", lambda ctx: [], layer=1)))


class SuspendThenReturn(DropThenReturn):
    """Before LLM layer 0 keep the first half of each image (the others wait outside layers 0..1); after layer 1
    bring every token back."""

    def vlm_plan(self) -> VLMPlan:
        half = Stage("llm", self.first_half, layer=-1, budget=lambda img: max(1, img.token_ids.numel() // 2),
                     name="half")
        back = Stage("llm", self.everything, layer=1, name="back", reactivate=True)
        return VLMPlan((half, back))


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl"])
@torch.no_grad()
def test_tokens_dropped_before_layer_0_come_back_and_decode_like_single_prompts(family):
    model = tiny_vlm(family)
    layers = model.model.language_model.layers
    x = tiny_inputs(model, family, IMAGES, padding_side="left")
    seen = []
    hook = layers[0].register_forward_hook(lambda m, a, k, o: seen.append(a[0].shape[1] if a else
                                                                          k["hidden_states"].shape[1]),
                                           with_kwargs=True)
    method = SuspendThenReturn()
    try:
        with prunelab.apply(model, method) as h:
            model(**x)
            counts = [[k.numel() for k in kept] for _, kept in h.state.history]
            n = [img.span.num_tokens for img in h.state.images]
            batch = generate_tail(model, x, n=4)
            singles = torch.cat([generate_tail(model, sample_inputs(x, b, IMAGES), n=4) for b in range(len(IMAGES))])
    finally:
        hook.remove()
    assert counts == [[max(1, k // 2) for k in n], n]  # half before layer 0, everything back after layer 1
    assert seen[0] < x["input_ids"].shape[1]  # layer 0 ran on fewer rows than the prompt has
    assert torch.equal(batch, singles)
    ctx = method.seen[0]
    for img in ctx.images:  # at layer 1 the suspended tokens are not held and carry their input embeddings
        assert int((~img.held).sum()) == img.token_ids.numel() - max(1, img.token_ids.numel() // 2)
