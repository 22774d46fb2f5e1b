"""FlowCut (methods/flowcut/README.md): its scores, the prune schedule inside the encoder, the LLM cut, batches.
The invariants every method shares (keep-all, apply twice, remove, batch = per sample, bad inputs) run in
tests/test_invariants.py."""

from __future__ import annotations

import math

import pytest
import torch
from vlm_helpers import generate_tail

import prunelab
from prunelab.common.tiny_vlm import photo_llava, sample_inputs, tiny_inputs, tiny_vlm
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
