"""The decoder seam (common/decoder.py) and the in-place KV cache (common/kv_cache.py)."""

from __future__ import annotations

import pytest
import torch
from decoder_models import FAMILIES, padded_batch, tiny_decoder
from transformers import DynamicCache

import prunelab
from prunelab.common.attend import attend_selected, gather_rows
from prunelab.common.decoder import ATTN_NAME, decoder_spec
from prunelab.common.kv_cache import GrowingLayer, PrunelabCache
from prunelab.methods.baselines import DenseDecode, OracleTopK


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_through_the_seam_equals_the_model(family):
    model = tiny_decoder(family)
    ids, mask = padded_batch()
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=mask).logits
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        with prunelab.apply(model, DenseDecode()):
            assert model.config._attn_implementation == ATTN_NAME
            logits = model(input_ids=ids, attention_mask=mask).logits
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(out, ref)
    assert model.config._attn_implementation == "sdpa"


def test_remove_restores_and_other_models_stay_dense():
    a, b = tiny_decoder("llama"), tiny_decoder("llama", seed=3)
    ids, mask = padded_batch()
    with torch.no_grad():
        ref_b = b(input_ids=ids, attention_mask=mask).logits
        before = {k: v.clone() for k, v in a.state_dict().items()}
        h1 = prunelab.apply(a, OracleTopK(budget=8))
        h2 = prunelab.apply(a, OracleTopK(budget=8))  # applying twice = once: the first waits below the second
        assert h1.suspended and not h2.suspended and not (h1.removed or h2.removed)
        assert b.config._attn_implementation == "sdpa"
        assert torch.equal(b(input_ids=ids, attention_mask=mask).logits, ref_b)
        h2.remove()
        assert not h1.suspended and a.config._attn_implementation == ATTN_NAME
        h1.remove()
    assert a.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_prunelab_decoder") for m in a.modules())
    assert not a._forward_pre_hooks
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())


def test_spec_reads_grouped_query_attention():
    spec = decoder_spec(tiny_decoder("qwen2", heads=6, kv_heads=2))
    assert (spec.num_heads, spec.num_kv_heads, spec.group, spec.head_dim, spec.num_layers) == (6, 2, 3, 16, 3)


def test_unsupported_models_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(prunelab.UnsupportedModelError, match="RoPE"):
        prunelab.apply(gpt2, OracleTopK(budget=4))
    with pytest.raises(TypeError, match="method"):
        prunelab.apply(tiny_decoder("llama"), object())


def test_generate_uses_the_in_place_cache():
    model = tiny_decoder("llama")
    ids, mask = padded_batch()
    with torch.no_grad():
        filled = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        with prunelab.apply(model, DenseDecode()):
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            assert isinstance(out.past_key_values, PrunelabCache)
            step = model(input_ids=ids[:, -1:], past_key_values=filled)  # a cache the caller filled stays
            assert step.past_key_values is filled and type(filled) is DynamicCache


def test_growing_layer_matches_concatenation_and_derives_incrementally():
    torch.manual_seed(0)
    layer, steps = GrowingLayer(), [torch.randn(2, 3, n, 8) for n in (300, 1, 1, 257, 1)]
    calls = []

    def double(k):
        calls.append(k.shape[2])
        return 2 * k[..., :4]

    for i, k in enumerate(steps):
        keys, values = layer.update(k, -k)
        if i in (0, 3):
            layer.derived("x", double)
    ref = torch.cat(steps, dim=2)
    assert torch.equal(keys, ref) and torch.equal(values, -ref) and layer.get_seq_length() == 560
    assert torch.equal(layer.derived("x", double), 2 * ref[..., :4])
    assert calls == [300, 259, 1]  # each row derived once
    layer.crop(-10)
    assert torch.equal(layer.keys, ref[:, :, :550]) and layer.derived("x", double).shape[2] == 550
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.keys, ref[1:, :, :550])
    with pytest.raises(ValueError, match="num_layers"):
        PrunelabCache(0)


def test_gather_rows_on_cache_views_and_plain_tensors():
    torch.manual_seed(0)
    buf = torch.randn(2, 3, 50, 8)
    view = buf[:, :, :37]
    index = torch.randint(0, 37, (2, 3, 11))
    ref = view.gather(2, index[..., None].expand(-1, -1, -1, 8))
    assert torch.equal(gather_rows(view, index), ref)
    assert torch.equal(gather_rows(view.transpose(2, 3).contiguous().transpose(2, 3), index), ref)


@pytest.mark.parametrize("shared", [False, True])
def test_attend_selected_over_every_row_is_dense_attention(shared):
    torch.manual_seed(0)
    B, hq, hkv, T, d = 2, 6, 2, 29, 16
    q, k, v = torch.randn(B, hq, 1, d), torch.randn(B, hkv, T, d), torch.randn(B, hkv, T, d)
    heads = hkv if shared else hq
    index = torch.stack([torch.randperm(T) for _ in range(B * heads)]).view(B, heads, T)
    out = attend_selected(q, k, v, index, None, d**-0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
