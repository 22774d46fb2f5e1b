"""The invariant and bad-input matrix: every registered method and baseline on every backbone of its seams.

Generated from ``prunelab.registry``: a new entry is tested here without a line of its own. For each
(entry, backbone): keeping every token equals the dense model; applying twice equals once; ``remove()`` restores
outputs, parameters, hooks and attributes bit for bit; a batch (with padding, ragged image counts) equals one
sample at a time; the kept tokens obey the contract at every stage; each of the entry's bad settings raises an
error naming the parameter. Method files keep only what is specific to their paper.
"""

from __future__ import annotations

import functools

import pytest
import timm
import torch
from decoder_models import padded_batch, tiny_decoder
from vlm_helpers import generate_tail

import prunelab
from prunelab import registry
from prunelab.common.reduction import Reduction, check_reduction
from prunelab.common.tiny_vlm import sample_inputs, tiny_inputs, tiny_vlm
from prunelab.common.vit import ViTHandle
from prunelab.methods.dtop import Segmenter
from prunelab.methods.top_vim import PlainMamba, PlainMambaConfig, VimConfig, VisionMamba
from prunelab.methods.window_diffusion import DiffusionLM, tiny_llada, vanilla_generate, windowed_generate

# -- backbones: a tiny model, a batch and the output each seam is judged by ---------------------------------------
VIT = {"vit": "vit_tiny_patch16_224", "deit_distilled": "deit_tiny_distilled_patch16_224"}
SEGMENTERS = ("linear", "atm")  # prunelab's Segmenter with per-token or ATM heads
VIMS = ("vim", "plain_mamba")  # prunelab's VisionMamba (middle CLS, bidirectional) and PlainMamba (zig-zag, no CLS)
DECODERS = ("llama", "qwen2")
VLMS = ("llava", "llava_next", "qwen2_5_vl")
IMAGES = [1, 2]  # ragged image counts per prompt
DIFFUSION = ("llada", "dream")  # prunelab's DiffusionLM on Llama blocks, and on Qwen2 blocks with shifted logits
GEN_LENGTH = 16  # the answer length of the diffusion samplers


class Backbone:
    """A tiny model with a padded batch; ``run(model, b)`` is the output of sample ``b`` alone (``None``: batch)."""

    def __init__(self, seam: str, name: str):
        self.seam, self.name = seam, name
        if seam in ("vit", "segmenter", "vim"):
            torch.manual_seed(0)
            if seam == "vit":
                self.model = timm.create_model(VIT[name], pretrained=False, img_size=32, patch_size=4, depth=4,
                                               num_classes=10)
            elif seam == "segmenter":
                self.model = Segmenter.create("vit_tiny_patch16_224", 5, stage_ends=(1, 2, 3), head=name,
                                              img_size=32, patch_size=4, depth=4)
            elif name == "vim":
                self.model = VisionMamba(VimConfig(img_size=32, patch_size=4, embed_dim=32, depth=6, num_classes=10,
                                                   d_state=8))
            else:
                self.model = PlainMamba(PlainMambaConfig(img_size=32, patch_size=8, embed_dim=32, depth=6, d_state=8,
                                                         conv_size=3, num_classes=10))
            self.model.eval()
            self.x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
            self.size = 3
        elif seam == "decoder":
            self.model = tiny_decoder(name)
            self.ids, self.mask = padded_batch((40, 31, 36))
            self.size = 3
        elif seam == "diffusion":
            self.model = _tiny_diffusion(name)
            g = torch.Generator().manual_seed(2)
            self.x = [torch.randint(0, 60, (n,), generator=g) for n in (5, 9, 7)]
            self.size = 3
        else:
            self.model = tiny_vlm(name)
            self.x = tiny_inputs(self.model, name, IMAGES, padding_side="left")
            self.size = len(IMAGES)

    @torch.no_grad()
    def run(self, b: int | None = None, method=None) -> torch.Tensor:
        m = self.model
        if self.seam == "diffusion":  # the generated tokens, by the vanilla sampler or with the method
            prompts = self.x if b is None else self.x[b:b + 1]
            if method is None:
                return vanilla_generate(m, prompts, GEN_LENGTH).answer
            return windowed_generate(m, prompts, GEN_LENGTH, method).answer
        if self.seam in ("vit", "segmenter", "vim"):
            return m(self.x if b is None else self.x[b:b + 1])
        if self.seam == "decoder":
            ids, mask = (self.ids, self.mask) if b is None else (self.ids[b:b + 1], self.mask[b:b + 1])
            if b is not None:  # alone, without padding
                ids = ids[:, mask[0].bool()]
                mask = torch.ones_like(ids)
            out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
            return torch.stack(out.logits, 1)
        return generate_tail(m, self.x if b is None else sample_inputs(self.x, b, IMAGES), n=4)  # greedy tokens

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        """Prefill logits of the whole batch (the VLM's prompt; for the other seams, :meth:`run`)."""
        return self.model(**self.x).logits if self.seam == "vlm" else self.run()


BACKBONES = {"vit": list(VIT), "segmenter": list(SEGMENTERS), "vim": list(VIMS), "decoder": list(DECODERS),
             "vlm": list(VLMS), "diffusion": list(DIFFUSION)}


def _tiny_diffusion(name: str) -> DiffusionLM:
    """A random LLaDA- or Dream-style model whose head never predicts the mask id (as a trained one: the mask is
    never a target), so a decoded position never looks masked again."""
    if name == "llada":
        model = tiny_llada(vocab_size=64, hidden_size=32, layers=2)
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        model = DiffusionLM(Qwen2ForCausalLM(config).eval(), mask_id=63, eos_id=62, shift_logits=True)
    with torch.no_grad():
        head = model.lm.lm_head.weight
        head[model.mask_id] = head[:model.mask_id].mean(0)  # its logit: the mean of the others, never the argmax
    return model


@functools.cache
def backbone(seam: str, name: str) -> Backbone:
    return Backbone(seam, name)


CASES = [pytest.param(e.name, seam, bb, id=f"{e.name}-{bb}")
         for e in registry.entries() for seam in e.seams for bb in BACKBONES[seam] if seam != "diffusion"]
# Samplers (the diffusion seam) wrap the generation loop instead of being applied to the model: tested below.
SAMPLER_CASES = [pytest.param(e.name, bb, id=f"{e.name}-{bb}")
                 for e in registry.entries() if "diffusion" in e.seams for bb in BACKBONES["diffusion"]]


def _method(entry, bb: Backbone, settings):
    extra = entry.tiny(bb.model) if entry.tiny else {}
    return entry.build(bb.model, **{**extra, **settings})


def _fingerprint(model) -> tuple:
    """Everything an installation may touch: parameters, buffers, hooks, instance attributes, attention config."""
    hooks = tuple((n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules())
    attrs = tuple((n, tuple(sorted(k for k in vars(m) if not k.startswith("_") or "prunelab" in k)))
                  for n, m in model.named_modules())
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    return hooks, attrs, impl, {k: v.clone() for k, v in model.state_dict().items()}


def _same_fingerprint(a, b) -> bool:
    return a[:3] == b[:3] and a[3].keys() == b[3].keys() and all(torch.equal(a[3][k], b[3][k]) for k in a[3])


def _kept_sets(handle):
    """``(stage, kept, n)`` for every stage of the last forward that records its kept tokens."""
    state = getattr(handle, "state", None)
    if state is None:
        return []
    if isinstance(handle, ViTHandle):
        return [(f"block {b}", ids, None) for b, ids in state.kept]
    return [(f"{stage}, image {i}", k[None], None) for stage, kept in state.history for i, k in enumerate(kept)]


@pytest.mark.parametrize("name,seam,bb_name", CASES)
def test_keep_all_equals_dense(name, seam, bb_name):
    entry, bb = registry.get(name), backbone(seam, bb_name)
    dense = bb.logits()
    with prunelab.apply(bb.model, _method(entry, bb, entry.keep_all)):
        kept = bb.logits()
    torch.testing.assert_close(kept, dense, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,seam,bb_name", CASES)
def test_apply_twice_equals_once_and_remove_is_bit_exact(name, seam, bb_name):
    entry, bb = registry.get(name), backbone(seam, bb_name)
    dense, before = bb.logits(), _fingerprint(bb.model)
    method = _method(entry, bb, entry.prune)
    with prunelab.apply(bb.model, method) as once:
        y1 = bb.logits()
        kept = _kept_sets(once)
        with prunelab.apply(bb.model, method):
            y2 = bb.logits()
        y3 = bb.logits()
    assert torch.equal(y1, y2) and torch.equal(y1, y3)
    if entry.prune:  # the pruning settings must prune, or the batch test below proves nothing
        assert y1.shape != dense.shape or not torch.allclose(y1, dense, atol=1e-4), f"{name} did not prune"
    assert kept or seam == "decoder", "a ViT, segmenter or VLM method must record the tokens each stage kept"
    for stage, ids, _ in kept:  # the contract at every stage of the pruned forward
        check_reduction(Reduction(ids, int(ids.max()) + 1), name=f"{name} at {stage}")
    assert torch.equal(bb.logits(), dense)
    assert _same_fingerprint(_fingerprint(bb.model), before)
    assert prunelab.handle_of(bb.model) is None


@pytest.mark.parametrize("name,seam,bb_name", CASES)
def test_batch_equals_one_sample_at_a_time(name, seam, bb_name):
    entry, bb = registry.get(name), backbone(seam, bb_name)
    with prunelab.apply(bb.model, _method(entry, bb, entry.prune)):
        batch = bb.run()
        singles = [bb.run(b) for b in range(bb.size)]
    if seam == "vlm":  # greedy tokens of each prompt
        assert torch.equal(batch, torch.cat(singles))
    else:
        for b, single in enumerate(singles):
            torch.testing.assert_close(batch[b:b + 1], single, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", [e.name for e in registry.entries() if e.bad])
def test_bad_settings_name_the_parameter(name):
    entry = registry.get(name)
    bb = backbone(entry.seams[0], BACKBONES[entry.seams[0]][0])
    extra = entry.tiny(bb.model) if entry.tiny else {}
    for settings, parameter in entry.bad:
        with pytest.raises((ValueError, TypeError), match=parameter):
            if bb.seam == "diffusion":
                bb.run(method=entry.build(bb.model, **{**extra, **settings}))
                continue
            with prunelab.apply(bb.model, entry.build(bb.model, **{**extra, **settings})):
                bb.logits()
        assert prunelab.handle_of(bb.model) is None


# -- samplers: keeping every token is the vanilla sampler; the model is input, never changed; batch = one by one ----
@pytest.mark.parametrize("name,bb_name", SAMPLER_CASES)
def test_sampler_keep_all_equals_vanilla(name, bb_name):
    entry, bb = registry.get(name), backbone("diffusion", bb_name)
    assert torch.equal(bb.run(method=_method(entry, bb, entry.keep_all)), bb.run())


@pytest.mark.parametrize("name,bb_name", SAMPLER_CASES)
def test_sampler_prunes_and_leaves_the_model_as_it_was(name, bb_name):
    entry, bb = registry.get(name), backbone("diffusion", bb_name)
    modes = [m.training for m in bb.model.modules()]
    before, method = _fingerprint(bb.model), _method(entry, bb, entry.prune)
    vanilla = vanilla_generate(bb.model, bb.x, GEN_LENGTH)
    first = windowed_generate(bb.model, bb.x, GEN_LENGTH, method)
    assert first.forward_tokens < vanilla.forward_tokens, f"{name} did not prune"
    assert torch.equal(windowed_generate(bb.model, bb.x, GEN_LENGTH, method).ids, first.ids)  # no state carried
    assert _same_fingerprint(_fingerprint(bb.model), before) and [m.training for m in bb.model.modules()] == modes
    with pytest.raises(TypeError, match="method"):  # a sampler is not installed into the model
        prunelab.apply(bb.model, method)
    assert prunelab.handle_of(bb.model) is None
    bb.model.train()  # training mode is input too: no dropout in these blocks, so the same tokens
    try:
        assert torch.equal(windowed_generate(bb.model, bb.x, GEN_LENGTH, method).ids, first.ids)
    finally:
        for m, mode in zip(bb.model.modules(), modes):
            m.training = mode


@pytest.mark.parametrize("name,bb_name", SAMPLER_CASES)
def test_sampler_batch_equals_one_sample_at_a_time(name, bb_name):
    entry, bb = registry.get(name), backbone("diffusion", bb_name)
    method = _method(entry, bb, entry.prune)
    batch = bb.run(method=method)
    for b in range(bb.size):
        assert torch.equal(batch[b:b + 1], bb.run(b, method=method))


def test_every_entry_is_covered():
    covered = {p.values[0] for p in CASES} | {p.values[0] for p in SAMPLER_CASES}
    assert covered == {e.name for e in registry.entries()}
    assert all(registry.get(b) for e in registry.methods() for b in e.baselines)
