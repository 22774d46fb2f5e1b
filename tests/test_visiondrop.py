"""VisionDrop (methods/visiondrop/README.md): the schedule rule, dominant selection and contextual merging by hand, the
stage-0 merge reaching the projector, per-layer visual counts, GQA against its MHA expansion, batches under
generate(), the CLS slot, official_quirks, bad inputs. The invariants every method shares run in
tests/test_invariants.py once the entry is registered; keep-all is also checked here."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from vlm_helpers import generate_tail

import prunelab
from prunelab.common.tiny_vlm import IMAGE_TOKEN, photo_llava, sample_inputs, tiny_inputs, tiny_vlm
from prunelab.common.vlm_layout import adapter
from prunelab.methods.visiondrop import (
    OFFICIAL_SCHEDULE,
    VisionDrop,
    budget_schedule,
    contextual_targets,
    selection,
    stage_counts,
    visiondrop_reduction,
)

IMAGES = [1, 2]
KEEP_ALL = ((1.0, 0.0), (1.0, 0.0), (1.0, 0.0))
PRUNE = ((0.5, 0.25), (0.5, 0.25), (0.5, 0.25))


# -- the schedule --------------------------------------------------------------------------------------------------
def test_budget_rule_gives_the_official_schedule_and_averages_T():
    assert budget_schedule(32) == OFFICIAL_SCHEDULE == ((42, 6), (30, 5), (22, 4), (16, 3))
    for T in range(2, 300):
        s = [d + c for d, c in budget_schedule(T)]
        assert sum(s) == 4 * T and s == sorted(s, reverse=True) and s[-1] >= 1
        assert all(d >= 1 for d, _ in budget_schedule(T, contextual_share=0.5))
    assert budget_schedule(64, contextual_share=0.25) == ((72, 24), (52, 18), (39, 13), (28, 10))
    with pytest.raises(ValueError, match="budget"):
        budget_schedule(1)


def test_stage_counts_follow_each_image():
    official = OFFICIAL_SCHEDULE
    assert [stage_counts(official, k, n) for k, n in enumerate((576, 48, 35, 26))] == list(official)
    # a NeXT image holding 130 patches after stage 0: the LLM stages keep the official proportions
    assert stage_counts(official, 1, 130) == (81, 14)  # 130 * 30/48 = 81.25, 130 * 5/48 = 13.54
    assert stage_counts(official, 1, 47, absolute=True) == (30, 5)  # official_quirks: the counts as they are
    assert stage_counts(((0.5, 0.25),), 0, 7) == (4, 2)  # 3.5 -> 4 (half up), 1.75 -> 2
    with pytest.raises(ValueError, match="schedule"):
        stage_counts(official, 0, 40)


# -- selection and merging by hand -----------------------------------------------------------------------------------
def test_targets_are_every_step_th_token_of_the_rest():
    assert contextual_targets(534, 6).tolist() == [0, 89, 178, 267, 356, 445]  # LLaVA-1.5: 576 - 42 patches
    assert contextual_targets(10, 3).tolist() == [0, 3, 6]
    assert contextual_targets(2, 5).tolist() == [0, 1]  # fewer than c: all of them
    assert contextual_targets(8, 0).numel() == 0


def test_contextual_token_is_the_target_plus_the_mean_of_its_members():
    score = torch.tensor([0.1, 0.2, 0.0, 0.9, 0.3, 0.1, 0.2, 0.8, 0.1, 0.0])
    metric = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.2, 1.0], [5.0, 5.0], [1.0, -0.3], [0.0, 1.0], [-0.1, 1.0],
                           [-3.0, 2.0], [0.9, 0.2], [1.0, 1.0]])
    x = torch.arange(10, dtype=torch.float32).exp2()[None, :, None]  # 2^j: every sum is distinct
    red = visiondrop_reduction(score[None], metric[None], d=2, c=2)
    # dominant {3, 7}; R = [0, 1, 2, 4, 5, 6, 8, 9], step 8 // 2 = 4: targets R[0] = 0 and R[4] = 5;
    # 1, 4, 8 are closest to token 0, 2 and 6 to token 5; 9 is as close to both and joins the first target, 0
    assert red.keep.tolist() == [[0, 3, 5, 7]]
    assert not red.merge.average and sorted(red.merge.src[0].tolist()) == [1, 2, 4, 6, 8, 9]  # |R| - c members
    v = x[0, :, 0]
    expected = torch.stack([v[0] + v[[1, 4, 8, 9]].mean(), v[3], v[5] + v[[2, 6]].mean(), v[7]])
    torch.testing.assert_close(red.gather(x)[0, :, 0], expected)


def test_a_target_without_members_stays_and_c_zero_drops_the_rest():
    score = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.1], [1.0, 0.2], [1.0, 0.15]]])
    x = torch.randn(1, 6, 3)
    red = visiondrop_reduction(score, metric, d=1, c=2)
    # dominant {1}; R = [0, 2, 3, 4, 5], step 5 // 2 = 2: targets 0 and 3; cosines put 2 (0 vs 0.0995), 4 (0.981 vs
    # 0.995) and 5 (0.989 vs 0.999) with token 3, so token 0 has no member and stays itself
    assert red.keep.tolist() == [[0, 1, 3]]
    out = red.gather(x)[0]
    torch.testing.assert_close(out, torch.stack([x[0, 0], x[0, 1], x[0, 3] + x[0, [2, 4, 5]].mean(0)]))
    dropped = visiondrop_reduction(score, metric, d=2, c=0)
    assert dropped.merge is None and dropped.keep.tolist() == [[0, 1]]  # equal scores go to the lower index
    with pytest.raises(ValueError, match="scores"):
        visiondrop_reduction(score * float("nan"), metric, d=1, c=2)
    with pytest.raises(ValueError, match="keys"):
        visiondrop_reduction(score, metric * float("nan"), d=1, c=2)


def test_mean_query_score_is_the_mean_patch_querys_attention():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g)  # [rows, H, 1 + 4, d]
    for prefix in (0, 1):
        got = selection.mean_query_scores(q, k, 0.5, prefix=prefix)
        for r in range(2):
            want = sum(torch.softmax(k[r, h] @ q[r, h, prefix:].mean(0) * 0.5, -1)[prefix:] for h in range(3))
            torch.testing.assert_close(got[r], want)


# -- on the tiny VLMs -----------------------------------------------------------------------------------------------
@functools.cache
def _model(family: str):
    """One tiny model per family for the tests that leave it as they found it (apply / remove)."""
    return tiny_vlm(family)


def _mha(model):
    """The same model with every key/value head of the language model repeated (GQA's ``repeat_kv`` written into
    the weights): an MHA model with the same function."""
    cfg = copy.deepcopy(model.config)
    text = cfg.get_text_config()
    H, Hkv = text.num_attention_heads, text.num_key_value_heads
    head = getattr(text, "head_dim", None) or text.hidden_size // H
    text.num_key_value_heads = H
    state = dict(model.state_dict())
    for name, w in state.items():
        if "language_model" in name and (".k_proj." in name or ".v_proj." in name):
            state[name] = w.view(Hkv, head, *w.shape[1:]).repeat_interleave(H // Hkv, 0).reshape(H * head,
                                                                                                  *w.shape[1:])
    mha = type(model)(cfg).eval()
    mha.load_state_dict(state)
    return mha


def _history(handle) -> list:
    return [(name, [k.tolist() for k in kept]) for name, kept in handle.state.history]


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl"])
@torch.no_grad()
def test_keep_all_equals_the_dense_model(family):
    model = _model(family)
    x = tiny_inputs(model, family, IMAGES, padding_side="left")
    dense = model(**x).logits
    with prunelab.apply(model, VisionDrop.for_model(model, llm_layers=(0, 1), schedule=KEEP_ALL)):
        kept = model(**x).logits
    torch.testing.assert_close(kept, dense, atol=1e-5, rtol=0)


def _official_reference(h, score, metric, d, c):
    """The encoder stage as the official code writes it (top-k, masks, a one-hot assignment matrix), on one tile:
    ``{patch index: value}`` of the dominant and contextual tokens."""
    dom = torch.topk(score, d).indices
    rest_mask = torch.ones(score.numel(), dtype=torch.bool)
    rest_mask[dom] = False
    rest = rest_mask.nonzero().flatten()
    m = metric[rest] / metric[rest].norm(dim=-1, keepdim=True)
    targets = torch.arange(0, rest.numel(), max(1, rest.numel() // c))[:c]
    others = ~torch.isin(torch.arange(rest.numel()), targets)
    one_hot = F.one_hot((m[others] @ m[targets].T).argmax(-1), c).float()  # [members, c]
    counts = one_hot.sum(0).clamp(min=1)[:, None]
    contextual = h[rest[targets]] + one_hot.T @ h[rest[others]] / counts
    return {**{int(j): h[j] for j in dom}, **{int(rest[t]): v for t, v in zip(targets, contextual)}}


@pytest.mark.parametrize("vit_query", ["cls", "mean"])
@torch.no_grad()
def test_stage0_merge_reaches_the_projector(vit_query):
    """The projector reads the feature layer's output with the dominant patches and the contextual tokens (target +
    mean of members) in place and zeros elsewhere, against the official formulation on scores recomputed from the
    layer's own query and key projections (the CLS row, or the mean patch query's row)."""
    model = _model("llava")
    x = tiny_inputs(model, "llava", IMAGES, padding_side="left")
    method = VisionDrop.for_model(model, schedule=((4, 3),), llm_layers=(), vit_query=vit_query)
    f = method.feature_layer
    assert f == model.config.vision_feature_layer % 4 - 1 == 1  # hidden_states[2] is encoder layer 1's output
    tower = model.model.vision_tower
    attn = adapter("llava").vision_blocks(model)[f].self_attn
    grabbed = []
    hooks = [p.register_forward_hook(lambda m, a, o: grabbed.append(o)) for p in (attn.q_proj, attn.k_proj)]
    hidden = tower(x["pixel_values"], output_hidden_states=True).hidden_states[f + 1][:, 1:]
    for hook in hooks:
        hook.remove()
    T, N1, C = grabbed[0].shape
    H = attn.num_heads
    q, k = (t.view(T, N1, H, C // H).transpose(1, 2) for t in grabbed)
    query = q[:, :, :1] if vit_query == "cls" else q[:, :, 1:].mean(2, keepdim=True)  # the CLS or the mean patch
    row = ((query @ k.transpose(-1, -2)) * (C // H) ** -0.5).softmax(-1)[:, :, 0, 1:]  # [T, H, P]
    metric = k.mean(1)[:, 1:]
    seen = []
    with prunelab.apply(model, method):
        hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        model(**x)
        hook.remove()
    for t in range(T):
        expected = _official_reference(hidden[t], row[t].sum(0), metric[t], 4, 3)
        assert len(expected) == 7
        for j in range(hidden.shape[1]):
            want = expected.get(j, torch.zeros(C))
            torch.testing.assert_close(seen[0][t, j], want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_qwen_stage0_merges_units_before_the_merger():
    """On Qwen2.5-VL stage 0 runs after the last block, before the merger: the merger reads d + c merge units per
    image, of which at most c (the targets with members) differ from the dense tower's last block."""
    model = _model("qwen2_5_vl")
    x = tiny_inputs(model, "qwen2_5_vl", [1], padding_side="left")
    merger = model.model.visual.merger
    seen = []

    def run():
        hook = merger.register_forward_pre_hook(lambda m, a: seen.append(a[0]))  # after the engine's pre-hook
        model(**x)
        hook.remove()

    run()
    with prunelab.apply(model, VisionDrop.for_model(model, llm_layers=(0,), schedule=((3, 2), (2, 1)))) as h:
        run()
    dense, pruned = seen  # [units * m * m, C] in window order
    m2 = model.config.vision_config.spatial_merge_size ** 2
    dense, pruned = dense.view(-1, m2 * dense.shape[-1]), pruned.view(-1, m2 * pruned.shape[-1])
    assert dense.shape[0] == 8 and pruned.shape[0] == 5 and len(h.state.history[0][1][0]) == 5
    same = (pruned[:, None] == dense[None]).all(-1).any(-1)
    assert int(same.sum()) >= 3 and int((~same).sum()) >= 1  # 3 merged units into 2 targets: at least one changed


def test_share_schedule_averages_the_share():
    from prunelab.methods.visiondrop import share_schedule

    pairs = share_schedule(0.3, stages=2)  # sizes 0.3 * 3 * (48, 35, 26) / 109 of the encoder tokens
    size0 = sum(pairs[0])
    size1 = size0 * sum(pairs[1])
    size2 = size1 * sum(pairs[2])
    assert abs((size0 + size1 + size2) / 3 - 0.3) < 1e-12
    assert abs(size0 - 0.3 * 3 * 48 / 109) < 1e-12 and abs(pairs[0][1] / size0 - 6 / 48) < 1e-12
    with pytest.raises(ValueError, match="budget"):
        share_schedule(0.8, stages=2)  # the first stage would keep more than every token


def _visual_rows(model, method, x) -> list[int]:
    """Visual tokens each LLM layer runs on for a one-sample prompt (its rows minus its text tokens)."""
    rows = []
    hooks = [layer.register_forward_pre_hook(
        lambda m, a, k: rows.append((a[0] if a else k["hidden_states"]).shape[1]), with_kwargs=True)
        for layer in model.model.language_model.layers]
    with prunelab.apply(model, method):
        model(**x)
    for hook in hooks:
        hook.remove()
    text = int((x["input_ids"] != IMAGE_TOKEN).sum())
    return [r - text for r in rows]


@torch.no_grad()
def test_visual_count_per_layer_follows_the_schedule_and_averages_T():
    model = photo_llava(image_size=32, patch_size=4, vision_layers=3, text_layers=4)  # 64 patches, 4 LLM layers
    x = tiny_inputs(model, "llava", [1], padding_side="left")
    method = VisionDrop.for_model(model, budget=8, llm_layers=(0, 1, 2))
    assert method.schedule_for(64) == budget_schedule(8) == ((10, 2), (8, 1), (6, 1), (3, 1))
    counts = _visual_rows(model, method, x)
    assert counts == [12, 9, 7, 4] and sum(counts) / len(counts) == 8
    with prunelab.apply(model, method) as h:
        model(**tiny_inputs(model, "llava", IMAGES, padding_side="left"))
    assert [[len(k) for k in kept] for _, kept in _history(h)] == [[12] * 3, [9] * 3, [7] * 3, [4] * 3]
    for _, kept in _history(h):  # unique and in order
        assert all(k == sorted(set(k)) for k in kept)
    # official_quirks: the CLS is one of the 10 dominant tokens (9 patches here, no CLS slot in transformers' LLaVA),
    # and the LLM stages keep the schedule's counts as they are; the official scorer needs an MHA language model
    with pytest.raises(ValueError, match="official_quirks"):
        VisionDrop.for_model(model, budget=8, llm_layers=(0, 1, 2), official_quirks=True)
    mha = _mha(model)
    quirky = VisionDrop.for_model(mha, budget=8, llm_layers=(0, 1, 2), official_quirks=True)
    assert _visual_rows(mha, quirky, x) == [11, 9, 7, 4]


@torch.no_grad()
def test_gqa_scores_equal_the_mha_expanded_reference(monkeypatch):
    gqa = _model("llava")
    mha = _mha(gqa)
    x = tiny_inputs(gqa, "llava", IMAGES, padding_side="left")
    torch.testing.assert_close(mha(**x).logits, gqa(**x).logits, atol=1e-5, rtol=1e-4)
    from prunelab.common import vlm_run

    real, seen = vlm_run._image_mean, []  # LLaVA's LLM stages score with the kernel's column means
    monkeypatch.setattr(vlm_run, "_image_mean", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    runs = []
    for model in (gqa, mha):
        seen.clear()
        with prunelab.apply(model, VisionDrop.for_model(model, llm_layers=(0, 1), schedule=PRUNE)) as h:
            runs.append((model(**x).logits, list(seen), _history(h)))
    (logits_g, scores_g, kept_g), (logits_m, scores_m, kept_m) = runs
    assert kept_g == kept_m and len(scores_g) == 6  # 3 images x 2 LLM stages
    for a, b in zip(scores_g, scores_m):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits_g, logits_m, atol=1e-5, rtol=1e-4)


def _official_llm_score(model, K: int, out: torch.Tensor, cos_sin, valid, image, causal: bool) -> torch.Tensor:
    """The official LLM-stage score of one sample, written out: layer K + 1's input norm, q/k projections and RoPE on
    layer K's output ``out`` [L, C], the image queries' head-mean softmax over the valid keys (and, ``causal``, the
    earlier ones), averaged over those queries, at the image columns ``image`` [L] (bool)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    layer = model.model.language_model.layers[K + 1]
    attn, h = layer.self_attn, layer.input_layernorm(out[None])
    d = attn.head_dim
    q = attn.q_proj(h).view(1, -1, model.config.text_config.num_attention_heads, d).transpose(1, 2)
    k = attn.k_proj(h).view(1, -1, model.config.text_config.num_key_value_heads, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *cos_sin)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    L = out.shape[0]
    visible = valid[None, :].expand(L, L)
    if causal:
        visible = visible & torch.ones(L, L, dtype=torch.bool).tril()
    p = (q[0] @ k[0].transpose(-1, -2) * d ** -0.5).masked_fill(~visible, float("-inf")).softmax(-1).mean(0)
    return p[image][:, image].mean(0)


@pytest.mark.parametrize("mask", ["causal", "bidirectional"])
@torch.no_grad()
def test_llm_score_is_the_next_layers_image_block(monkeypatch, mask):
    """After layer K the score comes from layer K + 1's projections on layer K's output (the official boundary
    K + 1), with the causal mask or, as the ablation, none; against the block written out."""
    model = _model("llava")
    x = tiny_inputs(model, "llava", [1, 1], padding_side="left")
    from prunelab.common import vlm_run

    real, seen = vlm_run._image_mean, []
    monkeypatch.setattr(vlm_run, "_image_mean", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    layer0, inputs = model.model.language_model.layers[0], []
    hook = layer0.register_forward_hook(lambda m, a, k, o: inputs.append((o, k["position_embeddings"])),
                                        with_kwargs=True)  # before the engine's: it sees every row
    try:
        with prunelab.apply(model, VisionDrop.for_model(model, llm_layers=(0,), schedule=((6, 2), (3, 1)),
                                                        llm_score_mask=mask)) as h:
            model(**x)
    finally:
        hook.remove()
    out, (cos, sin) = inputs[0]
    prompt = h.state.prompt
    ids = x["input_ids"].gather(1, prompt.index)
    for b in range(2):
        image = (ids[b] == IMAGE_TOKEN) & prompt.valid[b]
        want = _official_llm_score(model, 0, out[b], (cos[b:b + 1], sin[b:b + 1]), prompt.valid[b], image,
                                   mask == "causal")
        torch.testing.assert_close(seen[b], want, atol=1e-6, rtol=1e-5)
        top = set(torch.sort(want, descending=True, stable=True).indices[:3].tolist())
        assert top <= set(torch.searchsorted(h.state.history[0][1][b], h.state.history[1][1][b]).tolist())


@torch.no_grad()
def test_positions_are_renumbered_after_each_drop_and_decoding_shifts():
    """llm_positions="compact" (official): the rows after each LLM stage take positions 0..L'-1, a decode step's
    position is the unpruned one minus the tokens dropped, and greedy decoding equals a teacher-forced forward of the
    prompt with its continuation; "keep": the kept rows keep their positions."""
    model = _model("llava")
    x = tiny_inputs(model, "llava", [1], padding_side="left")
    L = x["input_ids"].shape[1]
    layers = model.model.language_model.layers
    for positions in ("compact", "keep"):
        method = VisionDrop.for_model(model, llm_layers=(0, 1), schedule=((6, 2), (4, 1), (3, 1)),
                                      llm_positions=positions)
        seen = []
        with prunelab.apply(model, method) as h:
            hooks = [layer.register_forward_pre_hook(
                lambda m, a, k, _i=i, _seen=seen: _seen.append((_i, k["position_ids"])), with_kwargs=True)
                for i, layer in enumerate(layers)]
            try:
                tail = generate_tail(model, x, n=3)
            finally:
                for hook in hooks:
                    hook.remove()
            forced = model(**{**x, "input_ids": torch.cat([x["input_ids"], tail[:, :-1]], 1),
                              "attention_mask": torch.ones(1, L + 2, dtype=torch.long)}).logits
        prefill = {i: p[0].tolist() for i, p in seen[:len(layers)]}
        text = int((x["input_ids"] != IMAGE_TOKEN).sum())
        entry, after0, after1 = (text + len(k[0]) for _, k in h.state.history)  # stage 0, LLM stages 0 and 1
        assert prefill[0] == list(range(entry))
        if positions == "compact":
            assert prefill[1] == list(range(after0)) and prefill[2] == list(range(after1))
            steps = [p[0, 0].item() for i, p in seen[len(layers):] if i == 0]
            assert steps == [after1, after1 + 1]  # the unpruned L, L + 1 minus the tokens dropped
        else:
            assert prefill[2] == sorted(prefill[2]) and prefill[2][-1] == entry - 1 and len(prefill[2]) == after1
        assert torch.equal(forced[0, -3:].argmax(-1), tail[0])
    with pytest.raises(ValueError, match="llm_positions"):
        VisionDrop.for_model(_model("qwen2_5_vl"), llm_positions="compact")


@pytest.mark.parametrize("family,schedule", [("llava", ((6, 2), (4, 1), (3, 1))),
                                             ("llava_next", ((6, 2), (4, 1), (3, 1))), ("qwen2_5_vl", PRUNE)])
@torch.no_grad()
def test_batch_under_generate_equals_each_prompt_alone(family, schedule):
    model = _model(family)
    x = tiny_inputs(model, family, IMAGES, padding_side="left")
    with prunelab.apply(model, VisionDrop.for_model(model, llm_layers=(0, 1), schedule=schedule)) as h:
        batch = generate_tail(model, x, n=3)
        singles = torch.cat([generate_tail(model, sample_inputs(x, b, IMAGES), n=3) for b in range(2)])
        model(**x)
    assert torch.equal(batch, singles)
    last = h.state.history[-1][1]
    for img, kept in zip(h.state.images, last):
        if img.span.newline is not None:  # NeXT: every image_newline token stays
            assert bool(torch.isin(img.span.newline.nonzero().flatten(), kept).all())


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl"])
@torch.no_grad()
def test_a_prompt_without_an_image_runs_as_the_dense_model(family):
    model = _model(family)
    x = tiny_inputs(model, family, [1, 0], padding_side="left")  # the second prompt has no image
    dense = model(**x).logits
    with prunelab.apply(model, VisionDrop.for_model(model, llm_layers=(0, 1), schedule=PRUNE)) as h:
        out = model(**x).logits
    assert len(h.state.images) == 1 and len(h.state.history) == 3
    torch.testing.assert_close(out[1, -1], dense[1, -1], atol=1e-5, rtol=0)


@torch.no_grad()
def test_the_cls_is_one_of_the_dominant_tokens_where_it_reaches_the_llm():
    model = tiny_vlm("llava")
    model.config.vision_feature_select_strategy = "full"  # the projector reads the CLS too: 1 + 16 tokens
    ids = torch.tensor([[5, 6, 7] + [IMAGE_TOKEN] * 17 + [8, 9]])
    x = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
             pixel_values=torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    method = VisionDrop.for_model(model, schedule=((4, 2), (3, 1)), llm_layers=(0,))
    assert method.cls_in_prompt
    with prunelab.apply(model, method) as h:
        model(**x)
    stage0, llm = (kept[0] for _, kept in _history(h))
    assert len(stage0) == 6 and stage0[0] == 0  # the CLS (span token 0) + 3 patches + 2 contextual
    assert len(llm) == 4


def test_bad_inputs_name_the_parameter():
    cases = [(dict(budget=0), "budget"), (dict(budget=1), "budget"), (dict(budget=8, schedule=KEEP_ALL), "schedule"),
             (dict(schedule=((1.0, 0.0), (8, 1), (1.0, 0.0), (1.0, 0.0))), "schedule"),
             (dict(schedule=((8, 1), (9, 1), (4, 1), (2, 1))), "schedule"), (dict(llm_layers=(3, 1, 2)), "llm_layers"),
             (dict(llm_layers=(0, 1)), "llm_layers"), (dict(vit_query="max"), "vit_query"),
             (dict(llm_score_mask="both"), "llm_score_mask"), (dict(llm_positions="renumber"), "llm_positions"),
             (dict(official_quirks="yes"), "official_quirks"),
             (dict(contextual_share=1.0), "contextual_share"),
             (dict(contextual_share=0.1, schedule=KEEP_ALL + KEEP_ALL[:1]), "contextual_share")]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            VisionDrop(**kwargs)
    with pytest.raises(ValueError, match="feature_layer"):
        VisionDrop().vlm_plan()
    with pytest.raises(ValueError, match="vit_query"):
        VisionDrop.for_model(_model("qwen2_5_vl"), vit_query="cls", llm_layers=(0, 1), schedule=KEEP_ALL)
    llava = _model("llava")
    with pytest.raises(ValueError, match="llm_layers"):
        VisionDrop.for_model(llava, llm_layers=(0, 2), schedule=KEEP_ALL)
    with pytest.raises(ValueError, match="official_quirks"):
        VisionDrop.for_model(llava, llm_layers=(0, 1), schedule=PRUNE, official_quirks=True)
    x = tiny_inputs(llava, "llava", IMAGES, padding_side="left")
    with pytest.raises(ValueError, match="schedule"):  # 20 tokens asked of a 16-patch tile
        with prunelab.apply(llava, VisionDrop.for_model(llava, llm_layers=(0, 1), schedule=((16, 4), (8, 1), (4, 1)))):
            llava(**x)
    assert prunelab.handle_of(llava) is None
    layer = llava.config.vision_feature_layer
    llava.config.vision_feature_layer = -1  # the last encoder layer: no tower stage after it
    try:
        with pytest.raises(ValueError, match="model"):
            VisionDrop.for_model(llava, llm_layers=(0, 1), schedule=KEEP_ALL)
    finally:
        llava.config.vision_feature_layer = layer
