"""DToP: grading, the early-exit stage loop and its accounting (the paper's invariants; the registry-wide ones are in
test_invariants.py)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import prunelab
from prunelab import registry
from prunelab.methods.baselines import RandomExit
from prunelab.methods.dtop import DToP, Segmenter, atm_probability, exit_mask
from prunelab.methods.dtop.seam import compact


def segmenter(head="linear", ends=(1, 2, 3), classes=5, seed=0) -> Segmenter:
    torch.manual_seed(seed)
    return Segmenter.create("vit_tiny_patch16_224", classes, stage_ends=ends, head=head, img_size=32, patch_size=4,
                            depth=ends[-1] + 1).eval()


X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def run(model, method, x=X):
    with torch.no_grad(), prunelab.apply(model, method) as h:
        return model(x), h.state


# -- grading ---------------------------------------------------------------------------------------------------------
def test_top_k_per_class_on_a_hand_made_p():
    # 8 tokens, 3 classes; confidences chosen so that class 0 has 4 easy tokens, class 1 two, class 2 none
    conf = torch.tensor([0.95, 0.99, 0.5, 0.97, 0.92, 0.96, 0.93, 0.91])
    cls = torch.tensor([0, 0, 2, 0, 1, 1, 2, 0])
    probs = torch.full((1, 8, 3), 0.0)
    probs[0, torch.arange(8), cls] = conf
    probs[0, 2] = torch.tensor([0.25, 0.25, 0.5])
    active = torch.ones(1, 8, dtype=torch.bool)
    # p0 = 0.9: easy = all but token 2; class 0 easy {0: .95, 1: .99, 3: .97, 7: .91}, class 1 {4: .92, 5: .96},
    # class 2 {6: .93}
    assert exit_mask(probs, active, 0.9, 2)[0].tolist() == [True, False, False, False, False, False, False, True]
    assert exit_mask(probs, active, 0.9, 1)[0].tolist() == [True, False, False, True, True, False, False, True]
    assert exit_mask(probs, active, 0.9, 0)[0].tolist() == [True, True, False, True, True, True, True, True]
    # strict threshold: a token exactly at p0 is not easy
    assert not exit_mask(probs, active, 0.99, 0)[0, 1]
    # inactive tokens never exit and do not take a class's top-k places
    inactive = active.clone()
    inactive[0, 1] = False
    assert exit_mask(probs, inactive, 0.9, 2)[0].tolist() == [False, False, False, False, False, False, False, True]


def test_top_k_keeps_min_k_nc_most_confident_per_class_on_random_p():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4, 50, 6, generator=g) * 3, -1)
    active = torch.rand(4, 50, generator=g) > 0.2
    for k in (0, 1, 3, 50):
        out = exit_mask(probs, active, 0.6, k)
        conf, cls = probs.max(-1)
        for b in range(4):
            for c in range(6):
                easy = (active[b] & (conf[b] > 0.6) & (cls[b] == c)).nonzero().squeeze(1)
                stay = easy[conf[b, easy].argsort(descending=True, stable=True)[:k]]
                assert sorted(easy[out[b, easy]].tolist()) == sorted(set(easy.tolist()) - set(stay.tolist()))
        assert not (out & ~active).any()


def test_atm_probability_is_presence_times_mask_sigmoid():
    cls = torch.randn(2, 4, 2)
    mask = torch.randn(2, 7, 4)
    p = atm_probability(cls, mask)
    assert torch.allclose(p[1, 3, 2], cls[1, 2].softmax(-1)[0] * mask[1, 3, 2].sigmoid())
    with pytest.raises(ValueError, match="class_logits"):
        atm_probability(torch.randn(2, 5), mask)


def test_compact_pads_ragged_rows_within_the_contract():
    stay = torch.tensor([[True, False, True, True], [False, False, True, False], [False] * 4])
    red = compact(stay)
    assert red.counts.tolist() == [3, 1, 0]
    assert red.keep[0].tolist() == [0, 2, 3] and red.keep[1, 0] == 2
    assert compact(torch.ones(2, 4, dtype=torch.bool)).is_identity


# -- the stage loop ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["linear", "atm"])
def test_p0_one_is_the_dense_segmenter_bit_for_bit(head):
    m = segmenter(head)
    with torch.no_grad():
        dense = m(X)
    out, state = run(m, DToP(p0=1.0))
    assert torch.equal(out, dense)
    assert (state.exit_stage == 2).all() and (state.tokens_per_block == 64).all()


@pytest.mark.parametrize("head", ["linear", "atm"])
def test_p0_zero_k_zero_exits_everything_at_stage_one(head):
    m = segmenter(head)
    out, state = run(m, DToP(p0=0.0, k=0))
    assert state.tokens_per_block[:, 2:].eq(0).all() and state.tokens_per_head[:, 1:].eq(0).all()
    assert (state.exit_stage == 0).all()
    with torch.no_grad():
        x = m.embed(X)
        for b in m.stages[0]:
            x = m.vit.blocks[b](x)
        first = m.heads[0](x)
        # ATM: stage-1 mask logits weighted by the final head's presence (computed from its queries alone)
        final = m.heads[-1](x[:, :0])
        expected = m.heads[-1].scores(first.tokens, final.image) if head == "atm" else first.tokens
    assert torch.equal(state.token_scores, expected)


def test_lowering_p0_grows_the_stage_one_exits_and_never_raises_flops():
    m = segmenter(ends=(1, 3))  # one auxiliary stage: later exits cannot interfere
    exits, macs = [], []
    for p0 in (0.5, 0.4, 0.3, 0.25, 0.2, 0.0):
        _, state = run(m, DToP(p0=p0, k=1))
        exits.append(state.exit_stage == 0)
        macs.append(state.macs(m))
    for a, b, fa, fb in zip(exits, exits[1:], macs, macs[1:]):
        assert not (a & ~b).any() and (fb <= fa).all()
    assert exits[-1].any() and not exits[0].all()


def test_exited_predictions_are_frozen():
    m = segmenter()
    _, state = run(m, DToP(p0=0.3, k=1))
    first = state.exit_stage == 0
    assert first.any() and (~first).any()
    with torch.no_grad():
        x = m.embed(X)
        for b in m.stages[0]:
            x = m.vit.blocks[b](x)
        at_exit = m.heads[0](x).tokens
    assert torch.equal(state.token_scores[first], at_exit[first])
    # later layers cannot reach an exited token: change them, and its prediction stays
    with torch.no_grad():
        for b in (2, 3):
            for p in m.vit.blocks[b].parameters():
                p.add_(torch.randn_like(p))
        for p in m.heads[1:].parameters():
            p.add_(torch.randn_like(p))
    _, after = run(m, DToP(p0=0.3, k=1))
    assert torch.equal(after.exit_stage == 0, first)
    assert torch.equal(after.token_scores[first], state.token_scores[first])
    assert not torch.equal(after.token_scores[~first], state.token_scores[~first])


@pytest.mark.parametrize("head", ["linear", "atm"])
def test_partition_and_history_obey_the_contract(head):
    m = segmenter(head)
    _, state = run(m, DToP(p0=0.25 if head == "linear" else 0.31, k=2))
    assert (state.tokens_per_block[:, 2] < 64).any()
    for b in range(3):
        remaining = set(range(64))
        for s, (_, kept) in enumerate(state.history):
            ids = kept[b].tolist()
            assert ids == sorted(set(ids)) and set(ids) <= remaining
            exited = set((state.exit_stage[b] == s).nonzero().squeeze(1).tolist())
            assert exited.isdisjoint(ids) and exited | set(ids) == remaining  # active and exited partition
            assert len(ids) == state.tokens_per_head[b, s + 1]
            remaining = set(ids)


@pytest.mark.parametrize("head", ["linear", "atm"])
def test_key_padding_batch_equals_per_image_gather(head):
    m = segmenter(head)
    method = DToP(p0=0.25 if head == "linear" else 0.31, k=1)
    batch, state = run(m, method)
    counts = state.tokens_per_block[:, -1]
    assert len(set(counts.tolist())) > 1, "the images must keep different counts for this test to mean anything"
    for b in range(3):
        single, _ = run(m, method, X[b:b + 1])
        torch.testing.assert_close(batch[b:b + 1], single, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("head", ["linear", "atm"])
def test_analytic_flops_match_a_flop_counter_per_image(head):
    m = segmenter(head)
    # the math attention backend, whose matrix products the counter sees (it does not count CPU's fused kernel);
    # gradients on, as the counter's module tracker needs them around nn.MultiheadAttention
    for b in range(2):
        with (prunelab.apply(m, DToP(p0=0.3, k=1)) as h, sdpa_kernel(SDPBackend.MATH),
              FlopCounterMode(display=False) as fc):
            m(X[b:b + 1])
        assert (h.state.tokens_per_block[0, -1] < 64) and fc.get_total_flops() == 2 * int(h.state.macs(m)[0])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        m(X[:1])
    assert fc.get_total_flops() == 2 * m.dense_macs()


def test_training_mode_trains_every_head_with_selection_outside_the_graph():
    m = segmenter().train()
    target = torch.randint(0, 5, (3, 32, 32))
    with prunelab.apply(m, DToP(p0=0.25, k=1)) as h:
        _, outs = m(X, return_heads=True)
        m.loss(outs, target).backward()
    assert (h.state.exit_stage == 0).any()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.heads[0].parameters())
    assert m.vit.blocks[3].mlp.fc1.weight.grad.abs().sum() > 0


def test_random_exit_exits_its_share_of_each_images_active_tokens():
    m = segmenter()
    _, state = run(m, RandomExit(rates=(0.5, 0.25)))
    assert state.tokens_per_head[:, 1].eq(32).all() and state.tokens_per_head[:, 2].eq(24).all()
    with pytest.raises(ValueError, match="rates"):
        run(m, RandomExit(rates=(0.5,)))


def test_bad_models_and_inputs_name_the_parameter():
    m = segmenter()
    with pytest.raises(ValueError, match="images"):
        m(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="stage_ends"):
        Segmenter.create("vit_tiny_patch16_224", 5, stage_ends=(1, 2), img_size=32, patch_size=4, depth=4)
    with pytest.raises(ValueError, match="stage_ends"):
        Segmenter.create("vit_tiny_patch16_224", 5, img_size=32, patch_size=4, depth=5)
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=0)
    with pytest.raises(ValueError, match="vit"):
        Segmenter(vit, (1,), [torch.nn.Identity()])
    with pytest.raises(TypeError, match="method"):
        prunelab.apply(m, registry.build("random_drop", keep_ratio=0.5))
    assert prunelab.handle_of(m) is None


def test_atm_loss_matches_the_official_formulas_written_as_loops():
    from prunelab.methods.dtop import ATMHead, HeadOutput

    g = torch.Generator().manual_seed(0)
    head = ATMHead(8, 3, width=4, heads=2)
    out = HeadOutput(torch.randn(2, 4, 3, generator=g), torch.randn(2, 3, 2, generator=g))
    target = torch.tensor([[[0, 0, 1, 1]] * 4, [[2, 2, 255, 2]] * 4])  # [2, 4, 4]; image 1 has an ignored column
    got = head.loss(out, target, (2, 2))
    ce, focal, dice, n = [], 0.0, 0.0, 0
    for b in range(2):
        masks = torch.nn.functional.interpolate(out.tokens[b].T.reshape(1, 3, 2, 2), size=(4, 4), mode="bilinear",
                                                align_corners=False)[0]
        for c in range(3):
            here = bool((target[b] == c).any())
            ce.append((torch.nn.functional.cross_entropy(out.image[b, c][None], torch.tensor([0 if here else 1])),
                       1.0 if here else 0.1))
            if here:
                n += 1
                x, t = masks[c].flatten(), (target[b] == c).flatten().float()
                p = x.sigmoid()
                bce = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
                pt = p * t + (1 - p) * (1 - t)
                focal += (bce * (1 - pt) ** 2 * (0.25 * t + 0.75 * (1 - t))).mean()
                dice += 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    loss_ce = sum(term * w for term, w in ce) / sum(w for _, w in ce)
    torch.testing.assert_close(got, loss_ce + 20 * focal / n + dice / n)
