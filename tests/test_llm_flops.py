"""Analytic LLM MACs and KV bytes (prunelab.common.llm_flops) against torch's FlopCounterMode and real caches.

Models run with eager attention: FlopCounterMode has no formula for CPU's fused SDPA op
(``_scaled_dot_product_flash_attention_for_cpu``) and would miss the attention products, while eager computes
them as plain matmuls over the full score matrix, which is the convention counted. FlopCounterMode counts
2 FLOPs per MAC; everything else it counts is a matrix product, so the comparisons are exact.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from prunelab.common.llm_flops import LLMDims, decode_macs, kv_cache_bytes, prefill_macs, vlm_prefill_cost
from prunelab.common.reduction import Reduction
from prunelab.common.tiny_vlm import tiny_inputs, tiny_vlm
from prunelab.common.vlm import VLMRequest, install_vlm
from prunelab.common.vlm_layout import find_image_spans


def _text_model(kind: str):
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, attn_implementation="eager")
    config = tf.LlamaConfig(**common) if kind == "llama" else tf.Qwen2Config(**common)
    cls = tf.LlamaForCausalLM if kind == "llama" else tf.Qwen2ForCausalLM
    torch.manual_seed(0)
    return cls(config).eval()


def _flops(counts: dict, suffix: str) -> int:
    """FLOPs under the module whose name ends with ``suffix`` (FlopCounterMode attributes ops to every parent)."""
    return sum(sum(v.values()) for k, v in counts.items() if k.endswith(suffix))


def _count(fn) -> dict:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_flop_counts()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_prefill_and_decode_match_flop_counter(kind):
    model = _text_model(kind)
    dims = LLMDims.from_config(model.config)
    assert (dims.heads, dims.kv_heads, dims.head_dim, dims.gated_mlp) == (6, 2, 8, True)
    L = 37  # odd, so no term hides behind a power of two
    x = torch.randint(0, 96, (1, L))
    out = {}
    counts = _count(lambda: out.setdefault("o", model(x, use_cache=True)))
    # Qwen2's q/k/v biases are adds, not MACs; rotary embeddings are excluded by the convention.
    assert counts["Global"][torch.ops.aten.mm] + counts["Global"][torch.ops.aten.bmm] > 0
    assert _flops(counts, "Global") - _flops(counts, "rotary_emb") == 2 * prefill_macs(dims, L)
    assert _flops(counts, ".model") - _flops(counts, "rotary_emb") == 2 * prefill_macs(dims, L, logits=0)
    cache = out["o"].past_key_values
    nbytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert nbytes == kv_cache_bytes(dims, L, torch.float32) == kv_cache_bytes(dims, [L, L], 4)
    step = _count(lambda: model(torch.randint(0, 96, (1, 1)), past_key_values=cache))
    assert _flops(step, "Global") - _flops(step, "rotary_emb") == 2 * decode_macs(dims, L)


def test_formulas_by_hand():
    d = LLMDims(layers=1, hidden=4, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10)
    n = 3
    # q 3*4*4 + k,v 2*3*4*2 + o 3*4*4 + QK^T,AV 2*3*3*4 + gated MLP 3*3*4*8 + head 3*4*10
    assert prefill_macs(d, n) == 48 + 48 + 48 + 72 + 288 + 120
    assert decode_macs(d, 3) == 16 + 16 + 16 + 2 * 4 * 4 + 96 + 40  # one query over 3 cached + itself
    plain = LLMDims(1, 4, 2, 1, 2, 8, 10, gated_mlp=False)
    assert prefill_macs(d, n) - prefill_macs(plain, n) == n * 4 * 8
    assert prefill_macs(d, [3], logits=0) == prefill_macs(d, 3) - 120
    assert kv_cache_bytes(d, 5, torch.bfloat16) == 2 * 1 * 2 * 2 * 5
    with pytest.raises(ValueError, match="n: 2 per-layer"):
        prefill_macs(d, [3, 3])
    with pytest.raises(ValueError, match="cache_len"):
        decode_macs(d, -1)


class Half:
    """Keeps the first ceil(N/2) visual tokens of each image, before LLM layer 0."""

    def vlm_request(self):
        return VLMRequest()

    def vlm_budget(self, img, stage):
        return (img.embeds.shape[0] + 1) // 2

    def vlm_select(self, ctx):
        return [Reduction(torch.arange((n + 1) // 2)[None], n) for n in (img.embeds.shape[0] for img in ctx.images)]


def _eager_vlm(family):
    model = tiny_vlm(family)
    # The language model only: the vision tower keeps SDPA, it is not counted here.
    model.model.language_model.config._attn_implementation_internal = "eager"
    return model


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_vlm_prefill_pruned_matches_flop_counter(family):
    model = _eager_vlm(family)
    dims = LLMDims.from_config(model.config)
    x = tiny_inputs(model, family, [2])  # one sample: unpadded, so the per-sample count is what runs
    dense = _count(lambda: model(**x))
    with install_vlm(model, Half()) as h:
        pruned = _count(lambda: model(**x))
        cost = vlm_prefill_cost(model, x, h, logits=0, dtype=torch.float32)
    assert cost == vlm_prefill_cost(model, x, [k.numel() for k in h.state.kept], logits=0, dtype=torch.float32)
    (n,), (n_kept,) = cost.dense_tokens, cost.pruned_tokens
    dropped = sum(s.num_tokens - k.numel() for s, k in zip(h.state.prompt.spans, h.state.kept))
    assert n == x["input_ids"].shape[1] and n - n_kept == dropped > 0
    lm = ".language_model"
    assert _flops(dense, lm) - _flops(dense, "rotary_emb") == 2 * cost.dense_macs
    assert _flops(pruned, lm) - _flops(pruned, "rotary_emb") == 2 * cost.pruned_macs
    assert _flops(pruned, "lm_head") == 2 * n_kept * dims.hidden * dims.vocab  # model(**x): every position
    assert cost.macs_ratio < cost.kv_ratio < 1  # the quadratic attention term falls faster than the cache
    assert cost.pruned_kv_bytes == kv_cache_bytes(dims, n_kept, torch.float32)


def test_vlm_generate_and_padded_batch():
    model = _eager_vlm("llava")
    dims = LLMDims.from_config(model.config)
    x1 = tiny_inputs(model, "llava", [2])
    steps = 3
    with install_vlm(model, Half()) as h:
        counts = _count(lambda: model.generate(**x1, max_new_tokens=steps, do_sample=False, pad_token_id=0))
        cost = vlm_prefill_cost(model, x1, h, dtype=torch.float32)  # logits=1, as generate() asks
        cache = h.state.prompt.cache
        assert sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) == \
            kv_cache_bytes(dims, cost.pruned_tokens[0] + steps - 1, torch.float32)
        n = cost.pruned_tokens[0]
        expected = cost.pruned_macs + sum(decode_macs(dims, n + s) for s in range(steps - 1))
        measured = _flops(counts, ".language_model") + _flops(counts, "lm_head") - _flops(counts, "rotary_emb")
        assert measured == 2 * expected
        # A padded batch runs every row at the longest pruned length: B x that, not the per-sample sum.
        x2 = tiny_inputs(model, "llava", [1, 2])
        padded = _count(lambda: model(**x2))
        cost2 = vlm_prefill_cost(model, x2, h, logits=0)
    width = h.state.positions.shape[1]
    assert width == max(cost2.pruned_tokens)
    assert _flops(padded, ".language_model") - _flops(padded, "rotary_emb") == 2 * 2 * prefill_macs(dims, width,
                                                                                                     logits=0)
    assert cost2.pruned_macs < 2 * prefill_macs(dims, width, logits=0)


def test_vlm_prefill_cost_bad_inputs():
    model = tiny_vlm("llava")
    x = tiny_inputs(model, "llava", [1, 2])
    with pytest.raises(ValueError, match="kept: 2 counts for the 3 images"):
        vlm_prefill_cost(model, x, [1, 1])
    with pytest.raises(ValueError, match="kept: 10000 tokens for image 0"):
        vlm_prefill_cost(model, x, [10_000, 1, 1])

    class AfterLayer(Half):
        def vlm_request(self):
            return VLMRequest(llm_layer=0)

    with install_vlm(model, AfterLayer()) as h:  # halves after the projector, and again after LLM layer 0
        model(**x)
        cost = vlm_prefill_cost(model, x, h, logits=0)
        entry, after = [k.numel() for k in h.state.entry], [k.numel() for k in h.state.history[-1][1]]
    spans = find_image_spans(model, "llava", x["input_ids"], x["attention_mask"])
    dense = x["attention_mask"].sum(-1).tolist()
    first, later = list(dense), list(dense)
    for s, e, a in zip(spans, entry, after):
        first[s.sample] -= s.num_tokens - e
        later[s.sample] -= s.num_tokens - a
    dims = LLMDims.from_config(model.config)
    assert list(cost.pruned_tokens) == first and all(a < e for a, e in zip(after, entry))
    assert cost.pruned_macs == sum(prefill_macs(dims, [f, n, n], logits=0) for f, n in zip(first, later))
