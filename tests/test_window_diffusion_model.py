"""Window-Diffusion's substrate: the bidirectional diffusion LM, the LLaDA / Dream loaders and LLaDA's sampler."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from prunelab.methods.window_diffusion import (
    DiffusionLM,
    llada_generate,
    load_dream,
    load_llada,
    num_transfer_tokens,
    tiny_llada,
)

V = 64


@pytest.fixture(scope="module")
def model() -> DiffusionLM:
    return tiny_llada(vocab_size=V, seed=0)


def test_attention_is_bidirectional(model):
    ids = torch.randint(0, V - 2, (1, 9), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % (V - 2)
    with torch.no_grad():
        assert not torch.allclose(model(ids)[0, 0], model(changed)[0, 0])  # the first token sees the last


def test_left_padding_changes_nothing(model):
    ids = torch.randint(0, V - 2, (1, 7), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], 1)
    with torch.no_grad():
        alone, batched = model(ids), model(padded, mask)
    torch.testing.assert_close(batched[:, 3:], alone, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(batched).all()


def test_dream_shift(model):
    shifted = DiffusionLM(model.lm, model.mask_id, shift_logits=True)
    ids = torch.randint(0, V - 2, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain, moved = model(ids), shifted(ids)
    assert torch.equal(moved[:, 1:], plain[:, :-1]) and torch.equal(moved[:, 0], plain[:, 0])


# -- loaders ----------------------------------------------------------------------------------------------------------
def _rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    rot = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rot * sin


def llada_reference(sd, cfg, ids):
    """LLaDA's forward from its own parameter names (RMSNorm, RoPE, non-causal SDPA, SiLU(ff_proj) * up_proj)."""
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"]) * w

    h, kv, n = cfg["n_heads"], cfg["n_kv_heads"], ids.shape[1]
    d = cfg["d_model"] // h
    x = sd["model.transformer.wte.weight"][ids[0]]
    pos = torch.arange(n)
    for i in range(cfg["n_layers"]):
        p = {k.split(f"blocks.{i}.")[1]: v for k, v in sd.items() if f"blocks.{i}." in k}
        y = rms(x, p["attn_norm.weight"])
        q = _rope((y @ p["q_proj.weight"].T).view(n, h, d).transpose(0, 1), pos, cfg["rope_theta"])
        k = _rope((y @ p["k_proj.weight"].T).view(n, kv, d).transpose(0, 1), pos, cfg["rope_theta"])
        v = (y @ p["v_proj.weight"].T).view(n, kv, d).transpose(0, 1)
        k, v = k.repeat_interleave(h // kv, 0), v.repeat_interleave(h // kv, 0)
        att = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(n, -1)
        x = x + att @ p["attn_out.weight"].T
        y = rms(x, p["ff_norm.weight"])
        x = x + (F.silu(y @ p["ff_proj.weight"].T) * (y @ p["up_proj.weight"].T)) @ p["ff_out.weight"].T
    return (rms(x, sd["model.transformer.ln_f.weight"]) @ sd["model.transformer.ff_out.weight"].T)[None]


LLADA_CONFIG = {"model_type": "llada", "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2,
                "mlp_hidden_size": 48, "vocab_size": V, "embedding_size": V, "rope_theta": 500000.0,
                "rms_norm_eps": 1e-5, "max_sequence_length": 256, "weight_tying": False, "include_bias": False,
                "input_emb_norm": False, "scale_logits": False, "block_type": "llama", "layer_norm_type": "rms",
                "activation_type": "silu", "mask_token_id": V - 1, "eos_token_id": V - 2}


def _llada_folder(tmp_path, cfg=LLADA_CONFIG):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    c, m, h, kv = cfg["d_model"], cfg["mlp_hidden_size"], cfg["n_heads"], cfg["n_kv_heads"]
    d = c // h
    shapes = {"q_proj": (c, c), "k_proj": (kv * d, c), "v_proj": (kv * d, c), "attn_out": (c, c),
              "ff_proj": (m, c), "up_proj": (m, c), "ff_out": (c, m), "attn_norm": (c,), "ff_norm": (c,)}
    sd = {"model.transformer.wte.weight": torch.randn(V, c, generator=g),
          "model.transformer.ln_f.weight": 1 + 0.1 * torch.randn(c, generator=g),
          "model.transformer.ff_out.weight": torch.randn(V, c, generator=g) / math.sqrt(c)}
    for i in range(cfg["n_layers"]):
        for name, shape in shapes.items():
            t = 1 + 0.1 * torch.randn(shape, generator=g) if len(shape) == 1 else torch.randn(shape, generator=g)
            sd[f"model.transformer.blocks.{i}.{name}.weight"] = t if len(shape) == 1 else t / math.sqrt(shape[1])
    half = {k: v for j, (k, v) in enumerate(sd.items()) if j % 2 == 0}  # two shards with an index, as the hub's
    rest = {k: v for k, v in sd.items() if k not in half}
    save_file(half, tmp_path / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(rest, tmp_path / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {**{k: "model-00001-of-00002.safetensors" for k in half},
                                            **{k: "model-00002-of-00002.safetensors" for k in rest}}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return sd


def test_llada_checkpoint_loads_and_computes_llada(tmp_path):
    sd = _llada_folder(tmp_path)
    loaded = load_llada(tmp_path)
    assert loaded.mask_id == V - 1 and loaded.eos_id == V - 2 and not loaded.shift_logits
    ids = torch.randint(0, V - 2, (1, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), llada_reference(sd, LLADA_CONFIG, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("key,value", [("input_emb_norm", True), ("scale_logits", True), ("weight_tying", True),
                                       ("block_type", "sequential"), ("layer_norm_type", "default")])
def test_llada_unsupported_config_is_refused(tmp_path, key, value):
    _llada_folder(tmp_path, {**LLADA_CONFIG, key: value})
    with pytest.raises(ValueError, match=key):
        load_llada(tmp_path)


def test_dream_checkpoint_loads_with_shifted_logits(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    qwen.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(model_type="Dream", architectures=["DreamModel"], mask_token_id=V - 1, eos_token_id=V - 2)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    dream = load_dream(tmp_path)
    assert dream.shift_logits and dream.mask_id == V - 1
    ids = torch.randint(0, V - 2, (2, 8), generator=torch.Generator().manual_seed(4))
    full = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    with torch.no_grad():
        expected = qwen(input_ids=ids, attention_mask=full).logits
        torch.testing.assert_close(dream(ids), torch.cat([expected[:, :1], expected[:, :-1]], 1))
    cfg.pop("mask_token_id")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mask_token_id"):
        load_dream(tmp_path)


# -- LLaDA's sampler --------------------------------------------------------------------------------------------------
def reference_llada(model, prompt, gen_length, steps):
    """LLaDA's low-confidence remasking for one prompt, written as a plain loop."""
    x = torch.cat([torch.as_tensor(prompt), torch.full((gen_length,), model.mask_id)])[None]
    base, rest = divmod(gen_length, steps)
    for t in range(steps):
        with torch.no_grad():
            logits = model(x)[0]
        x0 = logits.argmax(-1)
        conf = torch.softmax(logits, -1).gather(-1, x0[:, None])[:, 0]
        conf[x[0] != model.mask_id] = -math.inf
        for _ in range(base + (t < rest)):
            i = int(conf.argmax())
            x[0, i], conf[i] = x0[i], -math.inf
    return x[0, len(prompt):]


def test_schedule_splits_the_answer():
    assert num_transfer_tokens(10, 4) == [3, 3, 2, 2] and num_transfer_tokens(8, 8) == [1] * 8


@pytest.mark.parametrize("gen_length,steps", [(12, 12), (12, 5)])
def test_llada_sampler_equals_a_plain_loop(model, gen_length, steps):
    prompt = [3, 14, 15, 9, 2, 6]
    out = llada_generate(model, [prompt], gen_length, steps)
    assert torch.equal(out.answer[0], reference_llada(model, prompt, gen_length, steps))
    assert not bool((out.answer == model.mask_id).any())
    counts = torch.bincount(out.decoded_at[0], minlength=steps)
    assert counts.tolist() == num_transfer_tokens(gen_length, steps)  # every position decoded exactly once


def test_batch_with_different_prompt_lengths_equals_single_runs():
    model = tiny_llada(vocab_size=V, seed=1)
    model.double()  # no near-ties between rows computed at different paddings
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    batch = llada_generate(model, prompts, 10)
    for i, p in enumerate(prompts):
        single = llada_generate(model, [p], 10)
        assert torch.equal(batch.answer[i], single.answer[0]) and torch.equal(batch.decoded_at[i], single.decoded_at[0])
    assert batch.attention_mask[1, :4].sum() == 0


def test_sampling_and_random_remasking_are_seeded(model):
    runs = [llada_generate(model, [[1, 2, 3]], 8, temperature=1.0, remasking="random",
                           generator=torch.Generator().manual_seed(7)).answer for _ in range(2)]
    assert torch.equal(*runs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(gen_length=0), "gen_length"), (dict(gen_length=4, steps=5), "steps"),
    (dict(gen_length=4, temperature=-1.0), "temperature"), (dict(gen_length=4, remasking="entropy"), "remasking"),
    (dict(gen_length=4, pad_id=V - 1), "pad_id"),
])
def test_bad_arguments_name_the_parameter(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        llada_generate(model, [[1, 2]], **kwargs)
    with pytest.raises(ValueError, match="prompts"):
        llada_generate(model, [[1, model.mask_id]], 4)


def test_llada_checkpoint_that_does_not_fit_is_refused(tmp_path):
    _llada_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**LLADA_CONFIG, "n_layers": 3}))  # layer 2 has no weights
    with pytest.raises(ValueError, match="folder: .*does not fit the model: missing keys"):
        load_llada(tmp_path)
