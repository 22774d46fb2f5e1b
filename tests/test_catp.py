"""CATP (methods/catp/README.md): stage 1's greedy against brute force and its limits, stage 2's scores and counts,
the rows at layers K - 1 and K against eager attention, multi-image prompts with ragged image counts under
generate(), batch against single prompts, bad inputs. The invariants every method shares run in
tests/test_invariants.py; keep-all on many-shot prompts is also checked here."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from vlm_helpers import eager_attentions, generate_tail

import prunelab
from prunelab.common.tiny_vlm import sample_inputs, tiny_inputs
from prunelab.common.tokens import topk_sorted
from prunelab.common.vlm_plan import Needs, Stage, VLMPlan
from prunelab.methods.catp import (
    CATP,
    context_scores,
    context_total,
    facility_location,
    query_count,
    query_scores,
    rescaled_cosine,
    stage1_count,
)

SHOTS = [3, 1, 2]  # images per prompt: 2-shot, 0-shot, 1-shot (the last image of each prompt is the query)
TINY = {"layer": 1, "query_layer": 1}


def _objective(x, text, chosen, lambda_1):
    sim = rescaled_cosine(x, x)
    div = sim[list(chosen)].max(0).values.sum()
    align = rescaled_cosine(x[list(chosen)], text[None])[:, 0].sum() if text is not None else 0.0
    return float(div + lambda_1 * align)


# -- stage 1: the greedy ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_greedy_gains_never_increase_and_reach_the_bound_of_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    S, C = 9, 5
    x, text = torch.randn(S, C, generator=g), torch.randn(C, generator=g)
    for k in (2, 4, 6):
        keep, gains = facility_location(x, text, k, 0.7)
        assert keep.tolist() == sorted(set(keep.tolist())) and keep.numel() == k
        assert bool((gains[1:] <= gains[:-1] + 1e-6).all()), gains  # submodular: the marginal gains fall
        greedy = _objective(x, text, keep.tolist(), 0.7)
        assert greedy == pytest.approx(float(gains.sum()), rel=1e-5)  # the gains add up to F(Y)
        best = max(_objective(x, text, c, 0.7) for c in itertools.combinations(range(S), k))
        assert greedy >= (1 - 1 / math.e) * best - 1e-5 and greedy <= best + 1e-5


def test_greedy_limits_of_lambda_1():
    g = torch.Generator().manual_seed(3)
    x, text = torch.randn(30, 8, generator=g), torch.randn(8, generator=g)
    align = rescaled_cosine(x, text[None])[:, 0]
    by_text = topk_sorted(align, 7)
    assert torch.equal(facility_location(x, text, 7, float("inf"))[0], by_text)
    assert torch.equal(facility_location(x, text, 7, 1e6)[0], by_text)  # a large weight: the same ranking
    assert torch.equal(facility_location(x, text, 7, 0.0)[0], facility_location(x, None, 7)[0])  # facility location
    # lambda_1 = 0 by hand: the first pick has the largest column sum of sim, the second the largest gain over it
    sim = rescaled_cosine(x, x)
    first = int(sim.sum(1).argmax())
    second = int(torch.where(torch.arange(30) == first, -1.0, (sim - sim[first][None]).clamp(min=0).sum(1)).argmax())
    assert set(facility_location(x, None, 2)[0].tolist()) == {first, second}
    assert torch.equal(facility_location(x, text, 30)[0], torch.arange(30))  # k = S keeps everything
    for bad, name in ((0, "k"), (31, "k")):
        with pytest.raises(ValueError, match=name):
            facility_location(x, text, bad)
    with pytest.raises(ValueError, match="lambda_1"):
        facility_location(x, text, 3, -0.5)


def test_counts():
    assert [stage1_count(576, r) for r in (0.667, 0.778, 0.899)] == [383, 351, 317]
    assert [query_count(576, r) for r in (0.667, 0.778, 0.899)] == [191, 127, 58]
    assert stage1_count(576, 2 / 3) == 384 and query_count(576, 2 / 3) == 192  # no binary-error floor
    assert context_total([576] * 4, 0.778) == 511 and context_total([10, 7], 0.0) == 17
    assert stage1_count(1, 0.99) == 1 and query_count(3, 0.9) == 1


# -- stage 2: the scores ------------------------------------------------------------------------------------------
def test_context_scores_clip_the_increase_and_reduce_to_similarity():
    g = torch.Generator().manual_seed(0)
    a_prev, a_k = torch.rand(20, generator=g), torch.rand(20, generator=g)
    h, q = torch.randn(20, 6, generator=g), torch.randn(6, generator=g)
    increase = context_scores(a_k, a_prev, h, q, lambda_2=0.0)
    assert bool((increase >= 0).all()) and torch.allclose(increase, (a_k - a_prev).clamp(min=0))
    same = context_scores(a_k, a_k, h, q, lambda_2=0.6)  # no change of attention: the similarity ranking alone
    cos = torch.nn.functional.cosine_similarity(h, q[None], dim=-1)
    assert torch.allclose(same, 0.6 * cos) and torch.equal(topk_sorted(same, 5), topk_sorted(cos, 5))
    assert torch.allclose(query_scores(h, q), cos)
    assert torch.equal(topk_sorted(torch.tensor([1.0, 3.0, 3.0, 0.0]), 2), torch.tensor([1, 2]))  # ties: lower index


# -- on the models ------------------------------------------------------------------------------------------------
def _stage_counts(handle):
    return {name: [k.numel() for k in kept] for name, kept in handle.state.history}


@torch.no_grad()
def test_keep_all_is_dense_on_many_shot_prompts(family_model):
    family, model = family_model
    x = tiny_inputs(model, family, SHOTS, padding_side="left")
    dense, tail = model(**x).logits, generate_tail(model, x, n=4)
    with prunelab.apply(model, CATP.for_model(model, ratio=0.0, next_tokens="anyres", **TINY)):
        torch.testing.assert_close(model(**x).logits, dense, atol=1e-5, rtol=0)
        assert torch.equal(generate_tail(model, x, n=4), tail)


@pytest.mark.parametrize("ratio", [0.5, 0.778])
@torch.no_grad()
def test_each_stage_keeps_the_papers_counts(family_model, ratio):
    """Stage 1: floor(S_i (1 - R/2)) per image; after layer K the context images of each prompt hold
    floor((1 - R) sum S_i) between them; after layer K + 1 the query image holds floor((1 - R) S_q)."""
    family, model = family_model
    x = tiny_inputs(model, family, SHOTS, padding_side="left")
    method = CATP.for_model(model, ratio=ratio, **TINY)
    with prunelab.apply(model, method) as h:
        model(**x)
    spans = [img.span for img in h.state.images]
    S = [s.base_tokens for s in spans]  # NeXT: the base tile (next_tokens="base"); the others: every token
    counts = _stage_counts(h)
    assert counts["CATP stage 1"] == [stage1_count(n, ratio) for n in S]
    first = 0
    for n_images in SHOTS:
        members = list(range(first, first + n_images))
        context, query = members[:-1], members[-1]
        if context:
            total = max(len(context), context_total([S[i] for i in context], ratio))  # one token per image at least
            assert sum(counts["CATP stage 2, context"][i] for i in context) == total
        assert counts["CATP stage 2, context"][query] == counts["CATP stage 1"][query]
        assert counts["CATP stage 2, query"][query] == query_count(S[query], ratio)
        assert [counts["CATP stage 2, query"][i] for i in context] == [counts["CATP stage 2, context"][i]
                                                                      for i in context]
        first += n_images
    if family == "llava_next":
        assert counts["CATP base tile"] == S and all(s.base_tokens < s.num_tokens for s in spans)
    else:
        assert "CATP base tile" not in counts


class Recorder:
    """A plan that keeps everything after LLM layer 1 and records the rows CATP's context stage reads."""

    def __init__(self):
        self.seen = None

    def vlm_plan(self):
        return VLMPlan((Stage("llm", self.select, layer=1, needs=Needs(rows=("last",), previous=True)),))

    def select(self, ctx):
        from prunelab.common.reduction import Reduction

        self.seen = ctx
        return [Reduction.keep_all(1, img.embeds.shape[0]) for img in ctx.images]


@torch.no_grad()
def test_rows_at_layers_k_minus_1_and_k_are_the_models_attention(family_model):
    family, model = family_model
    x = tiny_inputs(model, family, SHOTS, padding_side="left")
    rec = Recorder()
    with prunelab.apply(model, rec):
        model(**x)
    attn = eager_attentions(model, x)
    for img in rec.seen.images:
        b, cols = img.span.sample, img.span.positions
        torch.testing.assert_close(img.rows["last"][:, 0], attn[1][b, :, -1, cols], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(img.previous_rows["last"][:, 0], attn[0][b, :, -1, cols], atol=1e-5, rtol=1e-4)


def test_previous_rows_need_an_llm_stage_after_layer_1_without_a_stage_before():
    keep = lambda ctx: []  # noqa: E731
    with pytest.raises(ValueError, match="previous"):
        Stage("llm", keep, layer=0, needs=Needs(rows=("last",), previous=True))
    with pytest.raises(ValueError, match="previous"):
        Stage("llm", keep, layer=2, needs=Needs(previous=True))
    with pytest.raises(ValueError, match="previous"):
        VLMPlan((Stage("llm", keep, layer=2, needs=Needs(rows=("last",), previous=True)), Stage("llm", keep, layer=1)))


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("positions", ["keep", "compact"])
@torch.no_grad()
def test_batch_equals_each_prompt_alone_under_generate(family_model, padding_side, positions):
    family, model = family_model
    if positions == "compact" and family == "qwen2_5_vl":
        with pytest.raises(ValueError, match="llm_positions"):
            CATP.for_model(model, llm_positions="compact", **TINY)
        return
    x = tiny_inputs(model, family, SHOTS, padding_side=padding_side)
    method = CATP.for_model(model, ratio=0.6, llm_positions=positions, **TINY)
    with prunelab.apply(model, method) as h:
        batch = generate_tail(model, x, n=4)
        kept = [[k.clone() for k in ks] for _, ks in h.state.history]
        singles, alone = [], []
        for b in range(len(SHOTS)):
            singles.append(generate_tail(model, sample_inputs(x, b, SHOTS), n=4))
            alone.append([[k.clone() for k in ks] for _, ks in h.state.history])
    assert torch.equal(batch, torch.cat(singles))
    first = 0
    for b, n in enumerate(SHOTS):  # the same tokens of every image at every stage
        for stage, got in zip(kept, alone[b]):
            assert all(torch.equal(u, v) for u, v in zip(stage[first:first + n], got))
        first += n


@torch.no_grad()
def test_pruning_changes_the_output_and_leaves_the_text(family_model):
    family, model = family_model
    x = tiny_inputs(model, family, SHOTS, padding_side="left")
    dense = model(**x).logits
    with prunelab.apply(model, CATP.for_model(model, ratio=0.778, **TINY)) as h:
        pruned = model(**x).logits
        valid = h.state.prompt.valid.sum(-1)
    image = (x["input_ids"] == model.config.image_token_id) & x["attention_mask"].bool()
    text = x["attention_mask"].sum(-1) - image.sum(-1)
    assert not torch.allclose(pruned[:, -1], dense[:, -1], atol=1e-4)  # the next token's logits
    assert bool((valid >= text).all())  # every text row is still in the prompt (the rows kept after stage 1)


def test_bad_settings_name_the_parameter(family_model):
    family, model = family_model
    for kwargs, name in (({"ratio": 1.0}, "ratio"), ({"ratio": "0.5"}, "ratio"), ({"lambda_1": -1}, "lambda_1"),
                         ({"layer": 0}, "layer"), ({"layer": 3, "query_layer": 2}, "query_layer"),
                         ({"layer": 1, "query_layer": 2}, "layer"), ({"next_tokens": "crops"}, "next_tokens"),
                         ({"context_mean": "x"}, "context_mean")):
        with pytest.raises(ValueError, match=name):
            CATP.for_model(model, **kwargs)
    with pytest.raises(ValueError, match="layer"):
        CATP(ratio=0.5).vlm_plan()


def test_layer_follows_the_depth(monkeypatch):
    from types import SimpleNamespace

    import prunelab.common.vlm_layout as layout

    monkeypatch.setattr(layout, "require_family", lambda model: "llava_next")
    assert CATP().layer is None
    for depth, K in ((32, 6), (28, 6), (40, 10)):
        text = SimpleNamespace(num_hidden_layers=depth)
        method = CATP.for_model(SimpleNamespace(config=SimpleNamespace(get_text_config=lambda t=text: t)))
        assert (method.layer, method.query_layer) == (K, K + 1)


def test_joint_ranking_adapts_the_budgets_and_keeps_one_token_per_image():
    from prunelab.methods.catp.method import _joint_top_k

    a, b, c = torch.tensor([0.9, 0.1, 0.8, 0.7]), torch.tensor([0.5, 0.6]), torch.tensor([0.05, 0.0, 0.02])
    assert [k.tolist() for k in _joint_top_k([a, b, c], 5)] == [[0, 2, 3], [1], [0]]  # c's best replaces b's 0.5
    assert [k.tolist() for k in _joint_top_k([a, b, c], 4)] == [[0, 2], [1], [0]]
    assert [k.tolist() for k in _joint_top_k([a, b], 6)] == [[0, 1, 2, 3], [0, 1]]
    assert [k.tolist() for k in _joint_top_k([torch.ones(3), torch.ones(2)], 2)] == [[0], [0]]  # ties: earlier first


def test_greedy_on_a_batch_of_images_equals_one_at_a_time():
    g = torch.Generator().manual_seed(5)
    x, text = torch.randn(3, 40, 16, generator=g), torch.randn(3, 16, generator=g)
    for lam, t in ((0.7, text), (float("inf"), text), (0.7, None)):
        keep, gains = facility_location(x, t, 11, lam)
        for b in range(3):
            k1, g1 = facility_location(x[b], None if t is None else t[b], 11, lam)
            assert torch.equal(keep[b], k1) and torch.allclose(gains[b], g1)
