"""HiPrune through the VLM seam on tiny random LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL models."""

from __future__ import annotations

import pytest
import torch
from vlm_helpers import generate_tail

import prunelab
from prunelab.common.handle import UnsupportedModelError
from prunelab.common.tiny_vlm import sample_inputs, tiny_inputs, tiny_vlm
from prunelab.common.vlm import install_vlm
from prunelab.methods.hiprune import HiPrune, hiprune_select
from prunelab.methods.hiprune.vlm import received_scores

RAGGED = [1, 2]
OBJECT_BLOCK = {"llava": 0, "llava_next": 0, "qwen2_5_vl": 1}  # tiny towers: 3 CLIP blocks; Qwen full blocks 1, 3




def _method(model, family, **kw):
    return HiPrune.for_model(model, object_block=OBJECT_BLOCK[family], **kw)


def _scores(family, img) -> dict:
    """HiPrune's scores per block from the statistics the engine recorded for ``img`` (``handle.state.images``)."""
    return {b: received_scores(family, v) for b, v in img.received.items()}


def _expected_next(model, method, img, size):
    """HiPrune on a NeXT image, placed with the true tile grid from ``image_sizes`` (independent of the
    adapter's inference) and ``unpad_image`` applied to the score maps themselves."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    v = model.config.vision_config
    side = v.image_size // v.patch_size
    rows, cols = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, v.image_size)
    obj, deep = method.blocks
    g = _scores("llava_next", img)
    maps = [g[b][1:].view(rows, cols, side, side).permute(0, 2, 1, 3).reshape(1, rows * side, cols * side)
            for b in (obj, deep)]
    mid, dp = (unpad_image(m, torch.tensor(size))[0] for m in maps)
    ur, uc = mid.shape
    tiles = rows * cols + 1
    n_patch = side * side + ur * uc
    budget = method.budget if isinstance(method.budget, int) else round(method.budget * n_patch)
    base_k = budget // tiles  # the official per-crop share for the base tile, the rest to the crops
    keep = [hiprune_select(g[obj][:1], g[deep][:1], (side, side), base_k)[0]] if base_k else []
    crop = hiprune_select(mid.reshape(1, -1), dp.reshape(1, -1), (ur, uc), budget - base_k)[0]
    keep.append(side * side + (crop // uc) * (uc + 1) + crop % uc)
    return torch.cat(keep).sort().values


def test_keep_all_is_dense(family_model):
    family, model = family_model
    x = tiny_inputs(model, family, RAGGED, padding_side="left")
    with torch.no_grad():
        dense = model(**x).logits
        with prunelab.apply(model, _method(model, family, budget=1.0, keep_newlines=True)) as h:
            kept = model(**x).logits
    torch.testing.assert_close(kept, dense, atol=1e-5, rtol=0)
    assert all(torch.equal(k, torch.arange(k.numel())) for k in h.state.kept)


@pytest.mark.parametrize("budget", [3, 0.4])
def test_kept_set_is_hiprune_select(family_model, budget):
    family, model = family_model
    x = tiny_inputs(model, family, RAGGED, padding_side="right")
    method = _method(model, family, budget=budget)
    with torch.no_grad(), install_vlm(model, method) as h:
        model(**x)
    obj, deep = method.blocks
    assert obj != deep and len(h.state.kept) == len(h.state.images) == 3
    for i, (img, kept) in enumerate(zip(h.state.images, h.state.kept)):
        span = img.span
        if family == "llava_next":
            expected = _expected_next(model, method, img, x["image_sizes"][i].tolist())
            n_patch = span.num_tokens - int(span.newline.sum())
            assert not span.newline[kept].any()  # newlines dropped by default
        else:
            g = _scores(family, img)  # LLaVA: [1, P]; Qwen: [N] per merged token
            mid, dp = (g[b].reshape(1, -1) for b in (obj, deep))
            n_patch = span.num_tokens
            k = budget if isinstance(budget, int) else round(budget * n_patch)
            expected = hiprune_select(mid, dp, span.grid, k)[0]
        k = budget if isinstance(budget, int) else round(budget * n_patch)
        assert kept.dtype == torch.int64 and kept.numel() == k and bool((kept[1:] > kept[:-1]).all())
        assert torch.equal(kept, expected)
    tok = model.config.image_token_id
    for b in range(2):  # text untouched, in order
        pos = h.state.positions[b][h.state.positions[b] >= 0]
        ids, valid = x["input_ids"][b], x["attention_mask"][b].bool()
        assert torch.equal(pos[ids[pos] != tok], ((ids != tok) & valid).nonzero().flatten())


def test_next_keep_newlines_keeps_every_newline():
    model = tiny_vlm("llava_next")
    x = tiny_inputs(model, "llava_next", RAGGED)
    with torch.no_grad(), install_vlm(model, _method(model, "llava_next", budget=4, keep_newlines=True)) as h:
        model(**x)
    for img, kept in zip(h.state.images, h.state.kept):
        nl = img.span.newline
        assert kept.numel() == 4 + int(nl.sum()) and bool(nl[kept].sum() == nl.sum())


@pytest.mark.parametrize("side", ["left", "right"])
def test_generate_batch_matches_per_sample(family_model, side):
    family, model = family_model
    x = tiny_inputs(model, family, RAGGED, padding_side=side)
    with prunelab.apply(model, _method(model, family, budget=3)) as h:
        # NeXT: generate() pops image_sizes before the forward; the seam recovers them from its
        # get_image_features wrapper, so the crop statistics are placed on the true tile grids.
        batch = generate_tail(model, x)
        if family == "llava_next":
            from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

            size = model.config.vision_config.image_size
            grids = [tuple(get_anyres_image_grid_shape(s, model.config.image_grid_pinpoints, size))
                     for s in x["image_sizes"].tolist()]
            assert [s.tiles for s in h.state.prompt.spans] == grids
        singles = torch.cat([generate_tail(model, sample_inputs(x, b, RAGGED)) for b in range(2)])
        pruned_last = model(**x).logits[:, -1]
    assert torch.equal(batch, singles)
    with torch.no_grad():
        assert not torch.allclose(pruned_last, model(**x).logits[:, -1], atol=1e-3)




def test_for_model_resolves_blocks():
    llava, qwen = tiny_vlm("llava"), tiny_vlm("qwen2_5_vl")
    m = HiPrune.for_model(llava, object_block=0)
    assert m.blocks == (0, 1) and m.encoder == "clip"  # vision_feature_layer=-2 of 3 blocks -> block 1
    assert HiPrune.for_model(qwen, object_block=1).blocks == (1, 3)  # the last block
    with pytest.raises(ValueError, match="object_block: block 8"):  # the paper's layer 9 on a 3-block tower
        HiPrune.for_model(llava)
    with pytest.raises(ValueError, match="object_block: block 0 .* window"):
        HiPrune.for_model(qwen, object_block=0)
    with pytest.raises(ValueError, match="encoder"):
        HiPrune.for_model(llava, encoder="qwen2_5_vl")


def test_negative_blocks_without_for_model(family_model):
    """The seam resolves the negative default deep block itself: same kept tokens as for_model's 0-based one."""
    family, model = family_model
    x = tiny_inputs(model, family, RAGGED)
    encoder = "qwen2_5_vl" if family == "qwen2_5_vl" else "clip"
    plain = HiPrune(budget=3, encoder=encoder, object_block=OBJECT_BLOCK[family])
    assert plain.blocks[1] < 0
    with torch.no_grad():
        with prunelab.apply(model, plain) as h:
            model(**x)
            kept = h.state.kept
        with prunelab.apply(model, _method(model, family, budget=3)) as h:
            model(**x)
            assert all(torch.equal(a, b) for a, b in zip(kept, h.state.kept))
    with pytest.raises(ValueError, match=r"vision_layers: \[-9\]"):  # checked at install, before any hook
        install_vlm(model, HiPrune(budget=3, encoder=encoder, object_block=-9))


def test_bad_inputs(family_model):
    family, model = family_model
    for kwargs, name in ((dict(budget=0), "budget"), (dict(budget=1.5), "budget"),
                         (dict(keep_newlines=1), "keep_newlines")):
        with pytest.raises(ValueError, match=name):
            HiPrune(**kwargs)
    x = tiny_inputs(model, family, RAGGED)
    with install_vlm(model, _method(model, family, budget=10_000)), pytest.raises(ValueError, match="budget 10000"):
        model(**x)
    text = tiny_inputs(model, family, [0, 0])
    with install_vlm(model, _method(model, family)), pytest.raises(ValueError, match="input_ids|pixel_values"):
        model(**text)
    wrong = HiPrune(budget=3, encoder="qwen2_5_vl" if family != "qwen2_5_vl" else "clip", object_block=1,
                    deep_block=1)
    with install_vlm(model, wrong), pytest.raises(ValueError, match="encoder"):
        model(**x)


def test_unsupported_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match="model:"):
        HiPrune.for_model(llama)
    with pytest.raises(UnsupportedModelError, match="model:"):
        install_vlm(llama, HiPrune(object_block=0, deep_block=0))
