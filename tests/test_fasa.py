"""FASA: frequency chunks, calibration, selection and the decoder methods (methods/fasa/README.md)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from decoder_models import padded_batch, tiny_decoder
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import prunelab
from prunelab.common.decoder import decoder_spec
from prunelab.common.kv_selection import budget_counts
from prunelab.methods.baselines import DenseDecode, OracleTopK, SinkRecent
from prunelab.methods.fasa import (
    FASA,
    Calibration,
    calibrate,
    chunk_dims,
    chunk_logits,
    contextual_agreement,
    dominant_chunks,
    dominant_dims,
)

D = 16  # head dim of the tiny models: 8 chunks


@pytest.fixture(scope="module")
def model():
    return tiny_decoder("llama")


@pytest.fixture(scope="module")
def cal(model):
    windows = torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    return calibrate(model, windows, ks=(4, 8, 16), n_queries=8, progress=False)


def generate(model, method, ids, mask, n=6, scores=False):
    with torch.no_grad(), prunelab.apply(model, method):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                             output_logits=scores, return_dict_in_generate=True)
    return (out.sequences, torch.stack(out.logits, 1)) if scores else out.sequences


# -- frequency chunks ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["rope_pairs", "official_contiguous"])
def test_chunk_logits_sum_to_the_full_logit(layout):
    torch.manual_seed(0)
    q, k = torch.randn(3, 5, D), torch.randn(3, 11, D)
    parts = chunk_logits(q, k, layout)
    assert parts.shape == (3, D // 2, 5, 11)
    torch.testing.assert_close(parts.sum(1), q @ k.transpose(-1, -2), atol=1e-5, rtol=1e-5)
    assert sorted(chunk_dims(D, layout).flatten().tolist()) == list(range(D))


def _rope(x, positions, theta=1e4):
    inv = theta ** (-torch.arange(0, D, 2).float() / D)
    freqs = positions[:, None].float() * inv[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    return apply_rotary_pos_emb(x, x, emb.cos()[None], emb.sin()[None])[0]


def test_true_pairs_are_shift_invariant_and_contiguous_pairs_are_not():
    """A chunk logit of transformers' rotate_half RoPE depends only on the offset when the chunk is a true pair."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, D), torch.randn(1, 1, D)
    t, s = torch.tensor([37]), torch.tensor([5])
    logits = {}
    for shift in (0, 123):
        qr, kr = _rope(q[None], t + shift)[0], _rope(k[None], s + shift)[0]
        logits[shift] = {lay: chunk_logits(qr, kr, lay) for lay in ("rope_pairs", "official_contiguous")}
    torch.testing.assert_close(logits[0]["rope_pairs"], logits[123]["rope_pairs"], atol=1e-4, rtol=1e-4)
    assert (logits[0]["official_contiguous"] - logits[123]["official_contiguous"]).abs().max() > 1e-2


def test_contextual_agreement_bounds_and_chance_level():
    torch.manual_seed(0)
    full = torch.randn(400, 64)
    same = contextual_agreement(full, full[:, None], (4, 16))
    assert torch.equal(same, torch.ones_like(same))
    rand = contextual_agreement(full, torch.randn(400, 3, 64), (8, 16, 32))
    assert ((rand >= 0) & (rand <= 1)).all()
    for i, k in enumerate((8, 16, 32)):  # E[CA] = K/T for independent rankings
        assert abs(rand[i].mean().item() - k / 64) < 0.03
    with pytest.raises(ValueError, match="ks"):
        contextual_agreement(full, full[:, None], (65,))


def test_dominant_chunk_rules_on_synthetic_agreement():
    ca = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.2, 0.7, 0.3, 0.0]])
    assert dominant_chunks(ca, 3).nonzero()[:, 1].tolist() == [1, 3, 5]  # ties go to the lower chunk
    # quantile 0.95 keeps {0.9} (1 chunk) -> raised to min_fc=2; quantile 0.8 (= 0.7) keeps 3 of at most 4
    assert dominant_chunks(ca, 4, "quantile", 0.95, min_fc=2).nonzero()[:, 1].tolist() == [1, 3]
    assert dominant_chunks(ca, 4, "quantile", 0.8, min_fc=2).nonzero()[:, 1].tolist() == [1, 3, 5]
    assert dominant_chunks(ca, 2, "quantile", 0.0, min_fc=1).sum() == 2  # everything passes, capped at 2
    mask = dominant_dims(dominant_chunks(ca, 2))
    assert mask.nonzero()[:, 1].tolist() == [1, 3, 9, 11]  # chunks 1 and 3 are dims (1, 9) and (3, 11)
    with pytest.raises(ValueError, match="n_fc"):
        dominant_chunks(ca, 9)


def test_budget_rule():
    lengths = torch.tensor([100, 7, 1])
    assert budget_counts(0.189, lengths).tolist() == [18, 1, 1]  # floor(b * t), at least 1
    assert budget_counts(50, lengths).tolist() == [50, 7, 1]
    assert [budget_counts(0.189, n) for n in (100, 7, 1)] == [18, 1, 1]  # the unpadded path, same rule


# -- calibration --------------------------------------------------------------------------------------------------
def test_calibration_file_round_trip_and_model_key(model, cal, tmp_path):
    spec = decoder_spec(model)
    assert cal.agreement.shape == (3, spec.num_layers, spec.num_heads, D // 2)
    assert ((cal.agreement >= 0) & (cal.agreement <= 1)).all()
    loaded = Calibration.load(cal.save(tmp_path / "c.json"))
    torch.testing.assert_close(loaded.agreement, cal.agreement, atol=1e-5, rtol=0)
    assert cal.for_budget(8)[1] == 8 and cal.for_budget(0.3)[1] == 16 and cal.for_budget(5)[1] == 16
    other = dataclasses.replace(cal, model="someone/else")
    other.check(spec, "rope_pairs")  # without the model only the shapes are compared: they match
    with pytest.raises(ValueError, match=r"calibration: .*name 'someone/else' != ''"):
        other.check(spec, "rope_pairs", model)  # the model's name (common.hf.model_source) is ""
    with pytest.raises(ValueError, match="calibration"):
        prunelab.apply(model, FASA(budget=8, calibration=other, n_fc=4))
    with pytest.raises(ValueError, match="calibration"):
        prunelab.apply(model, FASA(budget=8, calibration=cal, n_fc=4, fc_layout="official_contiguous"))
    with pytest.raises(ValueError, match="calibration"):
        prunelab.apply(model, FASA(budget=8, n_fc=4))
    with pytest.raises(ValueError, match="windows"):
        calibrate(model, torch.zeros(2, 10), ks=(4,), n_queries=2)
    with pytest.raises(ValueError, match="ks"):
        calibrate(model, torch.zeros(2, 10, dtype=torch.int64), ks=(16,), n_queries=2)


def test_calibration_agreement_matches_a_direct_computation(model):
    """One window, recomputed by hand from the layer's post-RoPE q and k captured by a hook."""
    ids = torch.randint(1, 97, (1, 24), generator=torch.Generator().manual_seed(5))
    cal = calibrate(model, ids, ks=(4,), n_queries=3, progress=False)
    captured = {}
    attn = model.model.layers[1].self_attn

    def grab(module, args, kwargs, out):
        h = kwargs["hidden_states"]
        q = module.q_proj(h).view(1, 24, -1, D).transpose(1, 2)
        k = module.k_proj(h).view(1, 24, -1, D).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        captured["q"], captured["k"] = apply_rotary_pos_emb(q, k, cos, sin)

    hook = attn.register_forward_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(ids)
    hook.remove()
    q, k = captured["q"][0], captured["k"][0].repeat_interleave(2, dim=0)
    expect = torch.zeros(4, D // 2)
    for h in range(4):
        for t in (21, 22, 23):
            full = q[h, t] @ k[h, : t + 1].T
            top = set(full.topk(4).indices.tolist())
            for j, (a, b) in enumerate(chunk_dims(D).tolist()):
                part = q[h, t, [a, b]] @ k[h, : t + 1][:, [a, b]].T
                expect[h, j] += len(top & set(part.topk(4).indices.tolist())) / 4 / 3
    torch.testing.assert_close(cal.agreement[0, 1], expect, atol=1e-5, rtol=0)


def test_calibration_records_the_model_and_refuses_another(model, cal, tmp_path):
    """Same shapes and the same (empty) name: a model built from a config differs only by its weights."""
    assert cal.fingerprint["model_type"] == "llama" and len(cal.fingerprint["weights"]["q_proj"]) == 64
    loaded = Calibration.load(cal.save(tmp_path / "c.json"))
    assert loaded.fingerprint == cal.fingerprint  # floats round-trip exactly through JSON
    fasa = FASA(budget=8, calibration=tmp_path / "c.json", n_fc=4)
    fasa.check_model(model)
    for dtype in (torch.bfloat16, torch.float16):  # the same weights in another dtype are the same model
        fasa.check_model(tiny_decoder("llama").to(dtype))
    other = tiny_decoder("llama", seed=3)
    assert decoder_spec(other) == decoder_spec(model)
    with pytest.raises(ValueError, match=r"calibration: .*weights .* differ"):
        fasa.check_model(other)
    qwen = tiny_decoder("qwen2")  # same shapes, another model type
    with pytest.raises(ValueError, match=r"calibration: .*model_type 'llama' != 'qwen2'"):
        prunelab.apply(qwen, fasa)
    with pytest.raises(ValueError, match=r"calibration: .*fingerprint"):
        prunelab.apply(model, FASA(budget=8, calibration=dataclasses.replace(cal, fingerprint=None), n_fc=4))


def test_installing_the_calibration_of_a_same_shape_model_raises(cal):
    with pytest.raises(ValueError, match=r"calibration: .*weights"):
        prunelab.apply(tiny_decoder("llama", seed=3), FASA(budget=8, calibration=cal, n_fc=4))


@pytest.mark.parametrize("text,message", [
    ("", "not valid JSON"), ('{"model": "", "revision": "", "fingerprint": {}, "agr', "not valid JSON"),
    ("[1, 2]", "not a valid FASA calibration"), ('{"model": "x", "agreement": [0.5]}', "older prunelab"),
    ("\x00\xff", "not valid JSON")])
def test_broken_calibration_files_name_calibration_and_the_file(cal, tmp_path, text, message):
    path = tmp_path / "broken.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=f"calibration: {path}.*{message}"):
        Calibration.load(path)
    with pytest.raises(ValueError, match="calibration"):
        prunelab.apply(tiny_decoder("llama"), FASA(budget=8, calibration=path, n_fc=4))
    with pytest.raises(FileNotFoundError, match="calibration"):
        Calibration.load(tmp_path / "missing.json")


@pytest.mark.parametrize("poison", [math.nan, math.inf, 1.5])
def test_calibration_with_nan_inf_or_out_of_range_agreement_is_refused(model, cal, tmp_path, poison):
    path = cal.save(tmp_path / "c.json")
    data = json.loads(path.read_text())
    data["agreement"] = [poison] * len(data["agreement"]) if poison != 1.5 else [*data["agreement"][:-1], poison]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"calibration: {path}.*(NaN or inf|\\[0, 1\\])"):
        prunelab.apply(model, FASA(budget=8, calibration=path, n_fc=4))
    with pytest.raises(ValueError, match="calibration"):
        dataclasses.replace(cal, agreement=torch.full_like(cal.agreement, math.nan))


# -- the decoder methods ------------------------------------------------------------------------------------------
def test_every_chunk_dominant_is_the_oracle(model, cal):
    ids, mask = padded_batch()
    for budget in (6, 0.3):
        fasa = generate(model, FASA(budget=budget, calibration=cal, n_fc=D // 2), ids, mask, scores=True)
        oracle = generate(model, OracleTopK(budget=budget), ids, mask, scores=True)
        assert torch.equal(fasa[0], oracle[0])
        torch.testing.assert_close(fasa[1], oracle[1], atol=1e-5, rtol=0)
        dense = generate(model, DenseDecode(), ids, mask, scores=True)
        assert (fasa[1] - dense[1]).abs().max() > 1e-4  # the budget does change the model


@pytest.mark.parametrize("method", [  # fractions: per-sequence budgets under padding; shared GQA modes
    FASA(budget=0.4, n_fc=3, gqa_mode="shared_sum"), OracleTopK(budget=0.25, gqa_mode="shared_max")])
def test_batch_with_padding_equals_one_sequence_at_a_time(model, cal, method):
    """Ragged budgets (a fraction of each sequence's own length) and pooled GQA selection; the invariant matrix
    (tests/test_invariants.py) runs the per-query-head count budgets."""
    if isinstance(method, FASA):
        method = dataclasses.replace(method, calibration=cal)
    ids, mask = padded_batch((40, 23))
    seqs, logits = generate(model, method, ids, mask, scores=True)
    for b, n in enumerate((40, 23)):
        one = generate(model, method, ids[b : b + 1, 40 - n :], mask[b : b + 1, 40 - n :], scores=True)
        assert torch.equal(seqs[b, 40:], one[0][0, n:])
        torch.testing.assert_close(logits[b], one[1][0], atol=1e-5, rtol=1e-5)


def test_per_query_head_on_repeated_kv_equals_grouped(model):
    """GQA: a model whose k/v heads are repeated per query head computes the same function."""
    spec = decoder_spec(model)
    mha = tiny_decoder("llama", kv_heads=4)
    state = model.state_dict()
    for name, w in state.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            state[name] = w.view(spec.num_kv_heads, D, -1).repeat_interleave(spec.group, 0).reshape(-1, w.shape[1])
    mha.load_state_dict(state)
    ids, mask = padded_batch()
    for method in (OracleTopK(budget=7), SinkRecent(budget=9, n_sink=3)):
        grouped = generate(model, method, ids, mask, scores=True)
        repeated = generate(mha, method, ids, mask, scores=True)
        assert torch.equal(grouped[0], repeated[0])
        torch.testing.assert_close(grouped[1], repeated[1], atol=1e-5, rtol=1e-5)


def test_selection_shapes_and_exact_budgets():
    torch.manual_seed(0)
    scores = torch.randn(2, 2, 3, 30)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :12] = False
    n = torch.tensor([9, 5])
    for mode, heads in (("per_q_head", 6), ("shared_sum", 2), ("shared_max", 2)):
        index, keep = OracleTopK(budget=9, gqa_mode=mode).select(scores, valid, n)
        assert index.shape == (2, heads, 9)
        counts = keep.sum(-1)
        assert (counts[0] == 9).all() and (counts[1] == 5).all()
        kept = index[1][keep[1]]
        assert (kept >= 12).all()  # padding is never selected
        for row in index[0]:
            assert len(set(row.tolist())) == 9
    shared = scores.sum(2)
    index, _ = OracleTopK(budget=4, gqa_mode="shared_sum").select(scores, None, 4)
    assert torch.equal(index.sort(-1).values, shared.topk(4).indices.sort(-1).values)


def test_sink_recent_keeps_first_and_last_real_tokens(model):
    spec = decoder_spec(model)
    scorer = SinkRecent(budget=6, n_sink=2).layer_scorer(spec, 1)

    class Call:
        keys = torch.zeros(1, 2, 12, D)
        valid = torch.tensor([[False] * 3 + [True] * 9])

    index, _ = SinkRecent(budget=6, n_sink=2).select(scorer(Call), Call.valid, torch.tensor([6]))
    assert sorted(index[0, 0].tolist()) == [3, 4, 8, 9, 10, 11]


def test_sink_recent_always_keeps_the_current_token(model):
    """A budget of at most n_sink tokens: refused as a count; at run time the current token is kept."""
    for budget, n_sink in ((4, 4), (3, 8), (1, 1)):
        with pytest.raises(ValueError, match="n_sink"):
            SinkRecent(budget=budget, n_sink=n_sink)
    spec = decoder_spec(model)
    method = SinkRecent(budget=0.2)  # n_sink = 8: floor(0.2 t) <= 8 for every context under 45 tokens
    scorer = method.layer_scorer(spec, 1)

    class Call:
        keys = torch.zeros(2, 2, 20, D)
        valid = torch.tensor([[True] * 20, [False] * 5 + [True] * 15])

    n = budget_counts(method.budget, torch.tensor([20, 15]))
    assert n.tolist() == [4, 3]
    index, keep = method.select(scorer(Call), Call.valid, n)
    kept = [sorted(index[b, 0][keep[b, 0]].tolist()) for b in range(2)]
    assert kept == [[0, 1, 2, 19], [5, 6, 19]]  # the first n - 1 sinks, then the current token
    # End to end: 5 % of 41..46 tokens keeps 2 (one sink + the current token), of 32..37 tokens 1 (the current).
    ids, mask = padded_batch((40, 31))
    for b, (length, same) in enumerate(((40, SinkRecent(budget=2, n_sink=1)), (31, SinkRecent(budget=1, n_sink=0)))):
        one = ids[b : b + 1, 40 - length :], mask[b : b + 1, 40 - length :]
        got = generate(model, SinkRecent(budget=0.05), *one, scores=True)
        ref = generate(model, same, *one, scores=True)
        assert torch.equal(got[0], ref[0])
        torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", [FASA(budget=9, n_fc=2), OracleTopK(budget=7), SinkRecent(budget=10, n_sink=2),
                                    DenseDecode(), OracleTopK(budget=10_000)])
def test_nan_activations_raise_naming_the_query_and_layer(model, cal, method):
    if isinstance(method, FASA):
        method = dataclasses.replace(method, calibration=cal)
    ids, mask = padded_batch()
    generate(model, method, ids, mask, n=2)  # finite: no error
    poisoned = tiny_decoder("llama")
    with torch.no_grad():
        poisoned.model.layers[1].self_attn.q_proj.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"query: NaN/inf .* layer 1$"):
        generate(poisoned, method, ids, mask, n=2)


def test_numpy_values_are_accepted_as_plain_python_values():
    fasa = FASA(budget=np.int64(8), n_fc=np.int32(4), tau=np.float32(0.5), fallback_k=np.int64(512),
                dense_layers=[0, np.int64(2)])
    assert fasa.budget == 8 and type(fasa.budget) is int and type(fasa.n_fc) is int and type(fasa.tau) is float
    assert type(fasa.fallback_k) is int and fasa.dense_layers == (0, 2)
    ratio = OracleTopK(budget=np.float64(0.25)).budget
    assert ratio == 0.25 and type(ratio) is float
    assert type(SinkRecent(budget=10, n_sink=np.int64(2)).n_sink) is int
    assert budget_counts(FASA(budget=np.int64(8)).budget, 20) == 8


def test_fallback_k_is_validated(cal):
    with pytest.raises(ValueError, match="fallback_k"):
        cal.for_budget(0.3, 0)  # was a ZeroDivisionError
    assert cal.for_budget(0.3, 5)[1] == 4


def test_triton_path_equals_torch_path(model, cal):
    """FASA's fused kernels (score + top-k, indexed decode attention) under the Triton interpreter."""
    pytest.importorskip("triton")
    ids, mask = padded_batch((30, 30))
    torch_out = generate(model, FASA(budget=7, calibration=cal, n_fc=3, impl="torch"), ids, mask, n=3, scores=True)
    triton_out = generate(model, FASA(budget=7, calibration=cal, n_fc=3, impl="triton"), ids, mask, n=3,
                          scores=True)
    assert torch.equal(torch_out[0], triton_out[0])
    torch.testing.assert_close(torch_out[1], triton_out[1], atol=1e-5, rtol=1e-5)
