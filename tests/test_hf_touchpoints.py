"""transformers' private touch points (prunelab.common.hf): a version bump fails here first, and loudly."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from decoder_models import tiny_decoder

from prunelab.common import hf


def test_transformers_is_the_checked_version():
    assert transformers.__version__ == hf.CHECKED_VERSION, (
        f"transformers {transformers.__version__} is installed, but prunelab.common.hf was checked against "
        f"{hf.CHECKED_VERSION}: re-read each touch point in common/hf.py against the new release, then update "
        "CHECKED_VERSION")


def test_sdpa_attention_matches_torch():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    params = set(inspect.signature(sdpa_attention_forward).parameters)
    assert {"module", "query", "key", "value", "attention_mask"} <= params
    model = tiny_decoder("llama")
    attn = model.model.layers[0].self_attn
    q, k, v = (torch.randn(1, 4, 5, 16) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA: 2 key/value heads
    out, _ = hf.sdpa_attention(attn, q, k, v, None, scaling=0.25, is_causal=False)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           scale=0.25)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_registered_attention_and_config_switch():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    def fn(*args, **kwargs):
        return hf.sdpa_attention(*args, **kwargs)

    hf.register_attention("prunelab_touchpoint_test", fn)
    hf.register_attention("prunelab_touchpoint_test", fn)  # idempotent
    assert AttentionInterface._global_mapping["prunelab_touchpoint_test"] is fn
    assert "prunelab_touchpoint_test" in AttentionMaskInterface._global_mapping
    with pytest.raises(RuntimeError, match="already registered"):
        hf.register_attention("prunelab_touchpoint_test", lambda *a, **k: None)
    model = tiny_decoder("llama")
    ids = torch.randint(1, 97, (1, 9))
    with torch.no_grad():
        dense = model(ids).logits
        undo = hf.switch_attention([model.config], "prunelab_touchpoint_test")
        assert model.model.layers[0].self_attn.config._attn_implementation == "prunelab_touchpoint_test"
        switched = model(ids).logits  # the models dispatch through the config's function
        undo()
    assert model.config._attn_implementation == "sdpa" and torch.equal(switched, dense)
    assert "_attn_implementation_internal" not in model.config.to_dict()


def test_model_source_reads_the_name_and_revision(tmp_path):
    model = tiny_decoder("llama")
    assert hf.model_source(model) == ("", "")  # built from a config: nothing known
    model.save_pretrained(tmp_path / "m")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert hf.model_source(loaded) == (str(tmp_path / "m"), "")  # transformers 5 records no commit hash
    hf.set_model_source(loaded, "org/name", "abc123")
    assert hf.model_source(loaded) == ("org/name", "abc123") and loaded.config.name_or_path == "org/name"
    assert hf.model_source(torch.nn.Linear(2, 2)) == ("", "")


def test_llava_next_geometry():
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    assert hf.llava_next_tiles((32, 64), pinpoints, 32) == 3  # an exact pinpoint: base + a 1x2 grid of crops
    assert hf.llava_next_unpadded((32, 64), pinpoints, 32, 4) == ((1, 2), 4, 8)  # same aspect: nothing unpadded
    (rows, cols), h, w = hf.llava_next_unpadded((16, 64), pinpoints, 32, 4)
    assert (rows, cols) == (1, 2) and (h, w) == (2, 8)  # a wider image: half the rows are padding


def test_vision_window_index_is_a_permutation():
    grid = torch.tensor([[1, 8, 8]])
    index = hf.vision_window_index(grid, 2, 16, 2)
    assert sorted(index.tolist()) == list(range(16))


def test_cache_layer_classes():
    assert issubclass(hf.DynamicCache, transformers.Cache)
    assert {"update", "get_seq_length"} <= set(vars(hf.DynamicLayer)) | set(dir(hf.DynamicLayer))
