"""The VLM stage engine carries multi-stage plans: inside the vision tower, the projector and several LLM layers.

A toy plan prunes inside the vision tower after encoder layer 0 and after the projector (both scored by the CLS
query's row in the vision tower, or by the received attention on Qwen2.5-VL, which has no CLS) and after LLM layers
0 and 1 (scored by the attention rows of the last prompt token and of the mean text query, computed beside SDPA),
on all three families, batch 2 with left padding, under ``generate()``.
"""

from __future__ import annotations

import pytest
import torch
from vlm_helpers import eager_attentions, generate_tail

import prunelab
from prunelab.common.reduction import Reduction, check_reduction
from prunelab.common.tiny_vlm import sample_inputs, tiny_inputs
from prunelab.common.vlm import Needs, Stage, VLMPlan
from prunelab.common.vlm_methods import Composed
from prunelab.methods.baselines import RandomPrune
from prunelab.methods.divprune import DivPrune

IMAGES = [1, 2]


def _top(scores: torch.Tensor, k: int) -> Reduction:
    keep = torch.sort(scores, descending=True, stable=True).indices[:k].sort().values
    return Reduction(keep[None], scores.numel())


class ToyPlan:
    """Keeps ``share`` of the image tokens at each of three stages (1.0: keeps everything, statistics still read)."""

    def __init__(self, family: str, share: float = 0.5):
        self.family, self.share, self.seen = family, share, []

    def vlm_plan(self) -> VLMPlan:
        qwen = self.family == "qwen2_5_vl"
        vision = Needs(vision_layers=(-1,), received=qwen, cls_row=not qwen)
        tower = Needs(vision_layers=(0,), received=qwen, cls_row=not qwen)
        return VLMPlan((
            Stage("vision", self.in_tower, layer=0, needs=tower, budget=self.budget, name="toy tower"),
            Stage("projector", self.by_vision, needs=vision, budget=self.budget, name="toy projector"),
            Stage("llm", self.by_rows("last"), layer=0, needs=Needs(rows=("last",)), budget=self.budget),
            Stage("llm", self.by_rows("text_mean"), layer=1, needs=Needs(rows=("text_mean",)), budget=self.budget),
        ))

    def budget(self, img) -> int:
        return max(1, round(self.share * img.token_ids.shape[-1]))  # per tile at the vision stage

    def in_tower(self, ctx):
        """Per tile, the patches the CLS row (Qwen: the received attention, per merge unit) at layer 0 ranks first."""
        self.seen.append(ctx)
        out = []
        for img in ctx.images:
            if self.family == "qwen2_5_vl":
                s = img.received[0].mean(dim=(0, 2))[None]  # [H, N, 4] -> [1, N]
            else:
                s = img.cls_row[0].mean(dim=1)  # [tiles, H, P] -> [tiles, P]
            s = s.gather(1, img.token_ids)
            keep = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :img.budget].sort(dim=1).values
            out.append(Reduction(keep, s.shape[1]))
        return out

    def by_vision(self, ctx):
        self.seen.append(ctx)
        out = []
        for img in ctx.images:
            if self.family == "qwen2_5_vl":
                s = img.received[-1].mean(dim=(0, 2))  # [H, N, 4] -> [N]
            else:
                s = img.cls_row[-1].mean(dim=1).flatten()  # [tiles, H, P] -> tiles * P (NeXT newlines: 0)
                if img.span.newline is not None:
                    full = torch.zeros(img.span.num_tokens)
                    full[~img.span.newline] = s[: int((~img.span.newline).sum())]
                    s = full
            out.append(_top(s[img.token_ids], img.budget))
        return out

    def by_rows(self, selector):
        def select(ctx):
            self.seen.append(ctx)
            return [_top(img.rows[selector].mean(dim=(0, 1)), img.budget) for img in ctx.images]

        return select


def _model(family):
    from prunelab.common.tiny_vlm import tiny_vlm

    return tiny_vlm(family)


@pytest.fixture(scope="module", params=["llava", "llava_next", "qwen2_5_vl"])
def family_model(request):
    return request.param, _model(request.param)


@torch.no_grad()
def test_keep_all_plan_is_dense_under_forward_and_generate(family_model):
    family, model = family_model
    x = tiny_inputs(model, family, IMAGES, padding_side="left")
    dense_logits, dense_tail = model(**x).logits, generate_tail(model, x, n=4)
    plan = ToyPlan(family, share=1.0)
    with prunelab.apply(model, plan) as h:
        logits, tail = model(**x).logits, generate_tail(model, x, n=4)
    valid = x["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], dense_logits[valid], atol=1e-5, rtol=0)
    assert torch.equal(tail, dense_tail)
    assert [name for name, _ in h.state.history][:2] == ["toy tower", "toy projector"] and len(h.state.history) == 4


@torch.no_grad()
def test_three_stages_prune_in_order_and_batch_equals_per_sample(family_model):
    family, model = family_model
    x = tiny_inputs(model, family, IMAGES, padding_side="left")
    plan = ToyPlan(family)
    with prunelab.apply(model, plan) as h:
        batch = generate_tail(model, x, n=4)
        history = [(name, [k.clone() for k in kept]) for name, kept in h.state.history]
        singles = torch.cat([generate_tail(model, sample_inputs(x, b, IMAGES), n=4) for b in range(2)])
    assert torch.equal(batch, singles)
    assert len(history) == 4
    spans = plan.seen[1].images
    previous = [torch.arange(img.span.num_tokens) for img in spans]
    for name, kept in history:  # each stage keeps a sorted, unique subset of what the previous one kept
        for prev, k in zip(previous, kept):
            check_reduction(Reduction(k[None], int(prev.max()) + 1), name=name)
            expected = max(1, round(0.5 * prev.numel()))
            if name == "toy tower" and family == "llava_next":  # half of each tile; every newline stays
                expected = None
            assert bool(torch.isin(k, prev).all()) and k.numel() == (expected or k.numel())
        previous = kept
    assert [ctx.stage for ctx in plan.seen[:4]] == ["vision", "projector", "llm", "llm"]
    assert [ctx.layer for ctx in plan.seen[:4]] == [0, None, 0, 1]


@torch.no_grad()
def test_last_token_rows_are_the_models_attention(family_model):
    """The rows computed beside SDPA equal the eager attention probabilities of the same layer (keep-all)."""
    family, model = family_model
    x = tiny_inputs(model, family, IMAGES, padding_side="left")
    plan = ToyPlan(family, share=1.0)
    with prunelab.apply(model, plan) as h:
        model(**x)
    attn = eager_attentions(model, x)[0]  # layer 0: [B, H, L, L]
    ctx = plan.seen[2]  # the stage after LLM layer 0
    for img in ctx.images:
        b, cols = img.span.sample, img.span.positions
        expected = attn[b, :, -1, cols]  # the last prompt token's row over the image's tokens
        torch.testing.assert_close(img.rows["last"][:, 0], expected, atol=1e-5, rtol=1e-4)
    assert h.state.prompt is not None


@torch.no_grad()
def test_two_methods_compose_their_plans():
    model = _model("llava")
    x = tiny_inputs(model, "llava", IMAGES, padding_side="left")

    with prunelab.apply(model, DivPrune(budget=8)):
        alone = model(**x).logits
        with prunelab.apply(model, RandomPrune(budget=0.5, layer=1), on_existing="compose") as both:
            composed = model(**x).logits
            names = [name for name, _ in both.state.history]
            counts = [[k.numel() for k in kept] for _, kept in both.state.history]
        assert torch.equal(model(**x).logits, alone)  # the composition's removal restores DivPrune alone
    assert names == ["DivPrune", "random after LLM layer 1"] and counts == [[8, 8, 8], [4, 4, 4]]
    assert composed.shape[1] < alone.shape[1] and not torch.allclose(composed[:, -1], alone[:, -1])
    with pytest.raises(ValueError, match="on_existing: 'compose'"):
        import timm

        from prunelab.methods.zero_tprune import ZeroTPrune

        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=4)
        with prunelab.apply(vit, ZeroTPrune(keep_ratio=0.5)):
            prunelab.apply(vit, ZeroTPrune(keep_ratio=0.7), on_existing="compose")


@torch.no_grad()
def test_random_drop_inside_the_language_model():
    """RandomPrune(layer=K): the layers up to K see every visual token, the later ones the kept share, and each
    prompt keeps what it keeps alone; keeping all is the dense model; a layer with none after it is refused."""
    model = _model("llava")
    x = tiny_inputs(model, "llava", IMAGES, padding_side="left")
    dense = model(**x).logits
    with prunelab.apply(model, RandomPrune(budget=1.0, layer=0)):  # the matrix's tolerance for keep-all
        torch.testing.assert_close(model(**x).logits, dense, atol=1e-5, rtol=0)
    with prunelab.apply(model, RandomPrune(budget=0.5, layer=0)) as h:
        late = model(**x).logits
        names = [name for name, _ in h.state.history]
    assert names == ["random after LLM layer 0"] and not torch.allclose(late[:, -1], dense[:, -1])
    assert torch.equal(model(**x).logits, dense)  # the removal restores the dense model
    for b in range(len(IMAGES)):  # batch > 1 with padding: every prompt as it is alone
        with prunelab.apply(model, RandomPrune(budget=0.5, layer=0)):
            alone = model(**sample_inputs(x, b, IMAGES)).logits
        torch.testing.assert_close(alone[0, -1], late[b, -1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="layer"):
        RandomPrune(layer=-1)
    with pytest.raises(ValueError, match="layer"):
        with prunelab.apply(model, RandomPrune(layer=model.config.text_config.num_hidden_layers - 1)):
            model(**x)


def test_plan_validation_names_the_field():
    with pytest.raises(ValueError, match="where"):
        Stage("encoder", lambda ctx: [])
    with pytest.raises(ValueError, match="layer"):
        Stage("vision", lambda ctx: [])
    with pytest.raises(ValueError, match="layer"):
        Stage("llm", lambda ctx: [], layer=-2)
    with pytest.raises(ValueError, match="layer"):  # before layer 0 the language model has no attention to read
        Stage("llm", lambda ctx: [], layer=-1, needs=Needs(rows=("last",)))
    with pytest.raises(ValueError, match="layer"):
        Stage("llm", lambda ctx: [], layer=-1, reactivate=True)
    with pytest.raises(ValueError, match="layer"):
        Stage("projector", lambda ctx: [], layer=2)
    with pytest.raises(ValueError, match="rows"):
        Needs(rows=("first",))
    with pytest.raises(ValueError, match="rows"):
        Stage("projector", lambda ctx: [], needs=Needs(rows=("last",)))
    with pytest.raises(ValueError, match="stages"):
        VLMPlan(())


@torch.no_grad()
def test_a_visual_method_composes_with_a_kv_method_on_the_language_model():
    """HiPrune on the image tokens and a KV-cache method on the LLM's decode steps, together."""
    from prunelab.methods.baselines import OracleTopK
    from prunelab.methods.hiprune import HiPrune

    model = _model("llava")
    x = tiny_inputs(model, "llava", IMAGES, padding_side="left")
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    dense = model.generate(**x, **gen)
    hiprune = HiPrune.for_model(model, object_block=0, budget=0.5)
    with prunelab.apply(model, hiprune):
        alone = model.generate(**x, **gen)
        with prunelab.apply(model, OracleTopK(budget=10**6), on_existing="compose") as both:
            assert torch.equal(model.generate(**x, **gen), alone)  # a budget above the cache is exactly dense
            assert [name for name, _ in both.state.history] == ["HiPrune"] and both.spec.num_layers == 3
        with prunelab.apply(model, OracleTopK(budget=4), on_existing="compose"):
            small = model.generate(**x, **gen)
        assert torch.equal(model.generate(**x, **gen), alone)
        with pytest.raises(ValueError, match="KV-cache methods"):
            prunelab.apply(model, Composed(OracleTopK(budget=4), OracleTopK(budget=8)), on_existing="compose")
        assert torch.equal(model.generate(**x, **gen), alone)  # the refused composition left HiPrune installed
    assert not torch.equal(alone, dense) and not torch.equal(small, alone)
    assert torch.equal(model.generate(**x, **gen), dense)
    assert model.config.get_text_config()._attn_implementation == "sdpa"


@torch.no_grad()
def test_a_plan_reading_llm_rows_composes_with_a_kv_method():
    """Both read the language model's attention through one attention function: neither switches the other off."""
    from prunelab.methods.baselines import OracleTopK

    model = _model("llava")
    x = tiny_inputs(model, "llava", IMAGES, padding_side="left")
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with prunelab.apply(model, ToyPlan("llava")) as plan_handle:
        alone = model.generate(**x, **gen)
        with prunelab.apply(model, OracleTopK(budget=10**6), on_existing="compose") as both:
            assert torch.equal(model.generate(**x, **gen), alone)  # the KV method at a budget above the cache
            assert [name for name, _ in both.state.history][:2] == ["toy tower", "toy projector"]
        with prunelab.apply(model, OracleTopK(budget=4), on_existing="compose"):
            small = model.generate(**x, **gen)
        assert torch.equal(model.generate(**x, **gen), alone)
        assert len(plan_handle.state.history) == 4
    assert not torch.equal(small, alone)
    assert model.config.get_text_config()._attn_implementation == "sdpa"


@torch.no_grad()
def test_hiprune_composes_with_fasa_calibrated_on_the_vlms_language_model():
    from prunelab.methods.fasa import FASA
    from prunelab.methods.fasa.calibration import calibrate
    from prunelab.methods.hiprune import HiPrune

    model = _model("llava")
    windows = torch.randint(1, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    cal = calibrate(model, windows, ks=(4, 8), n_queries=8, progress=False)  # text windows through the VLM
    x = tiny_inputs(model, "llava", IMAGES, padding_side="left")
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with prunelab.apply(model, HiPrune.for_model(model, object_block=0, budget=0.5)):
        alone = model.generate(**x, **gen)
        with prunelab.apply(model, FASA(budget=10**6, calibration=cal, n_fc=4), on_existing="compose") as both:
            assert torch.equal(model.generate(**x, **gen), alone)  # a budget above the cache: exactly HiPrune
            assert [name for name, _ in both.state.history] == ["HiPrune"]
        with prunelab.apply(model, FASA(budget=8, calibration=cal, n_fc=4), on_existing="compose"):
            assert not torch.equal(model.generate(**x, **gen), alone)
