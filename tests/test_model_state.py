"""Model state counts as input: training mode, nested and repeated application, shared configs, copies.

Each case runs on every seam (timm ViT, prunelab's segmenter and Vim, transformers decoder, transformers VLM) where
it applies.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from decoder_models import padded_batch, tiny_decoder

import prunelab
from prunelab.common.decoder import ATTN_NAME
from prunelab.common.tiny_vlm import tiny_inputs, tiny_vlm
from prunelab.methods.baselines import OracleTopK, RandomDrop, RandomExit, SinkRecent
from prunelab.methods.divprune import DivPrune
from prunelab.methods.dtop import DToP, Segmenter
from prunelab.methods.hiprune import HiPrune
from prunelab.methods.top_vim import ToPViM, VimConfig, VisionMamba
from prunelab.methods.zero_tprune import ZeroTPrune


def _vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=4,
                             num_classes=10).eval()


def _vit_case():
    model = _vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, (lambda m=model: m(x)), ZeroTPrune(keep_ratio=0.5), RandomDrop(keep_ratio=0.7)


def _segmenter_case():
    torch.manual_seed(0)
    model = Segmenter.create("vit_tiny_patch16_224", 5, stage_ends=(1, 2, 3), img_size=32, patch_size=4,
                             depth=4).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, (lambda m=model: m(x)), DToP(p0=0.25, k=1), RandomExit(rates=(0.5, 0.5))


def _vim_case():
    torch.manual_seed(0)
    model = VisionMamba(VimConfig(img_size=32, patch_size=4, embed_dim=32, depth=6, num_classes=10, d_state=8)).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, (lambda m=model: m(x)), ToPViM(keep_ratio=0.5), ToPViM(keep_ratio=0.7, alignment="none")


def _decoder_case():
    model = tiny_decoder("llama")
    ids, mask = padded_batch()

    def run(m=model):  # decode-time methods change only the generated steps: score a few greedy steps
        out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
        return torch.stack(out.scores)

    return model, run, OracleTopK(budget=6), SinkRecent(budget=10, n_sink=2)


def _vlm_case():
    model = tiny_vlm("llava")
    x = tiny_inputs(model, "llava", [1, 2], padding_side="left")
    hiprune = HiPrune.for_model(model, object_block=0, budget=6)
    return model, (lambda m=model: m(**x).logits), DivPrune(budget=4), hiprune


CASES = {"vit": _vit_case, "segmenter": _segmenter_case, "vim": _vim_case, "decoder": _decoder_case,
         "vlm": _vlm_case}


@pytest.fixture(params=list(CASES))
def case(request):
    return CASES[request.param]()


@torch.no_grad()
def test_nested_application_restores_the_outer_method(case):
    model, run, a, b = case
    dense = run()
    with prunelab.apply(model, a):
        only_a = run()
        with prunelab.apply(model, b, on_existing="replace"):
            only_b = run()
        after_inner = run()
        assert prunelab.handle_of(model).method == a
    assert not torch.equal(only_a, dense) and not torch.equal(only_b, only_a)
    assert torch.equal(after_inner, only_a)  # the outer block is pruned again, not dense
    assert torch.equal(run(), dense) and prunelab.handle_of(model) is None


@torch.no_grad()
def test_a_different_method_is_an_explicit_choice(case):
    model, run, a, b = case
    with prunelab.apply(model, a):
        with pytest.raises(ValueError, match="on_existing='replace'"):
            prunelab.apply(model, b)
        with pytest.raises(ValueError, match="on_existing"):
            prunelab.apply(model, b, on_existing="compose-later")
        assert prunelab.handle_of(model).method == a


@torch.no_grad()
def test_applying_twice_equals_once_and_outer_removal_keeps_the_inner(case):
    model, run, a, _ = case
    dense = run()
    h1 = prunelab.apply(model, a)
    once = run()
    h2 = prunelab.apply(model, a)
    assert torch.equal(run(), once)
    h1.remove()  # removing the suspended outer handle leaves the installed one alone
    assert torch.equal(run(), once)
    h2.remove()
    assert torch.equal(run(), dense)


@torch.no_grad()
def test_deepcopy_gives_a_pruned_copy_with_its_own_handle(case):
    model, run, a, _ = case
    dense = run()
    with prunelab.apply(model, a):
        pruned = run()
        clone = copy.deepcopy(model)
        assert torch.equal(run(), pruned)  # the original is untouched by the copy
        own = prunelab.handle_of(clone)
        assert own is not None and own.model is clone and own.method == a
    assert torch.equal(run(), dense)  # the original's handle left; the copy keeps its own method
    assert torch.equal(run(clone), pruned)
    own.remove()
    assert torch.equal(run(clone), dense)


@pytest.mark.parametrize("kind", ["decoder", "vlm"])
def test_training_mode_is_refused_with_the_fix(kind):
    model, run, a, _ = CASES[kind]()
    model.train()
    with prunelab.apply(model, a), torch.no_grad(), pytest.raises(ValueError, match=r"model\.eval\(\)"):
        run()


@torch.no_grad()
def test_models_sharing_a_config_keep_their_own_methods():
    a = tiny_decoder("llama")
    b = type(a)(a.config).eval()  # built from the same config object
    b.load_state_dict(a.state_dict())
    b.generation_config.pad_token_id = 0
    ids, mask = padded_batch()

    def scores(m):
        out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
        return torch.stack(out.scores)

    dense = scores(b)
    ha = prunelab.apply(a, OracleTopK(budget=6))
    hb = prunelab.apply(b, OracleTopK(budget=6))
    pruned = scores(b)
    assert not torch.equal(pruned, dense)
    ha.remove()
    assert a.config._attn_implementation == ATTN_NAME  # b still uses it
    assert torch.equal(scores(b), pruned) and torch.equal(scores(a), dense)
    hb.remove()
    assert a.config._attn_implementation == "sdpa" and torch.equal(scores(b), dense)
    assert "_prunelab_attention_users" not in vars(a.config)


def test_wrong_types_name_the_parameter():
    with pytest.raises(ValueError, match="keep_ratio"):
        ZeroTPrune(keep_ratio="0.5")
    with pytest.raises(ValueError, match="cls_boost"):
        ZeroTPrune(cls_boost="no")
    with pytest.raises(ValueError, match=r"schedule\.removals\[1\]"):
        from prunelab.common.schedule import TokenSchedule

        TokenSchedule((2, 5), (10, 3.5))
    with pytest.raises(ValueError, match=r"iterations\[0\]"):
        ZeroTPrune(iterations=(2.5, 5, 1))
    with pytest.raises(TypeError, match=r"ZeroTPrune\(\.\.\.\)"):
        prunelab.apply(_vit(), ZeroTPrune)
    with pytest.raises(ValueError, match="official_quirks"):
        DivPrune(official_quirks=1)
    with pytest.raises(ValueError, match="keep_newlines"):
        HiPrune(keep_newlines="yes")


def test_numpy_scalars_are_accepted_as_their_python_types():
    assert DivPrune(budget=np.int64(64)).budget == 64 and type(DivPrune(budget=np.int64(64)).budget) is int
    assert type(DivPrune(budget=np.float64(0.25)).budget) is float
    assert HiPrune(budget=np.int32(96)).budget == 96 and type(HiPrune(budget=np.int32(96)).budget) is int
    assert ZeroTPrune(keep_ratio=np.float32(0.5)).keep_ratio == 0.5
    assert DivPrune(budget=np.int64(64)) == DivPrune(budget=64)
