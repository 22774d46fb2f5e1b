"""ToP-ViM: importance, selection, the three alignments, the seam and the MACs (the invariants every
alignment must keep)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import prunelab
from prunelab.common.reduction import Reduction, check_reduction
from prunelab.methods.dtop import DToP
from prunelab.methods.top_vim import (
    SSMOutputs,
    ToPViM,
    VimConfig,
    VimDims,
    VimMixer,
    VisionMamba,
    channel_reduce,
    check_vim_reduction,
    dense_macs,
    scaled_blocks,
    select_tokens,
    selective_scan_ref,
    token_importance,
    top_vim_macs,
    vim_keep_count,
    vim_macs,
    vim_small,
)
from prunelab.methods.top_vim.flops import token_macs, visit_macs

ALIGNMENTS = ("zero_slot", "decay_only", "gapped", "none")
PACKED = ("gapped", "none")  # the sequence shrinks to the kept tokens
CLS = 32  # the tiny model's 8 x 8 grid: M = 64 patches, the CLS at M // 2
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def tiny(seed: int = 0, **overrides) -> VisionMamba:
    torch.manual_seed(seed)
    cfg = dict(img_size=32, patch_size=4, embed_dim=32, depth=6, num_classes=10, d_state=8)
    return VisionMamba(VimConfig(**{**cfg, **overrides})).eval()


MODEL = tiny()


def run(method, model=MODEL, x=X):
    with torch.no_grad(), prunelab.apply(model, method) as h:
        return model(x), model.forward_tokens(x), h.state


# -- the count rule and the schedule ---------------------------------------------------------------------------------
def test_keep_count_follows_the_official_rule():
    assert [vim_keep_count(n, 0.8) for n in (197, 157, 125)] == [157, 125, 101]  # Vim-S: 197 -> 157 -> 125 -> 101
    assert [vim_keep_count(n, 0.8) for n in (65, 53, 43)] == [53, 43, 35]
    for n in range(2, 80):
        for r in (0.05, 0.3, 0.5, 0.65, 0.8, 0.99):
            k, base = vim_keep_count(n, r), math.ceil((n - 1) * r - 1e-9)
            assert k % 2 == 1 and k == (base + 1 if base % 2 == 0 else base) and 1 <= k <= n
    assert vim_keep_count(26, 1.0) == 26  # keep_ratio 1 keeps all, even where the rule would make 26 odd
    assert vim_keep_count(11, 0.7) == 7  # 10 * 0.7 = 7.000000000000001 in binary: still 7
    assert vim_keep_count(65, 0.01) == 1  # the CLS alone


def test_official_blocks_scale_with_depth():
    assert ToPViM().prune_blocks(24) == (5, 10, 15)
    assert [scaled_blocks(d) for d in (24, 12, 6, 2, 1)] == [(5, 10, 15), (3, 5, 8), (1, 3, 4), (1,), ()]
    assert ToPViM().tokens_per_block(197, 24) == [197] * 5 + [157] * 5 + [125] * 5 + [101] * 9


# -- importance --------------------------------------------------------------------------------------------------------
def ssm_of(fwd: torch.Tensor, bwd_flipped: torch.Tensor) -> SSMOutputs:
    return SSMOutputs(fwd, bwd_flipped)


def test_channel_reductions_on_a_hand_example():
    y = torch.tensor([[[1.0, -2.0], [-3.0, 4.0], [2.0, 0.0]]])  # [B=1, D'=3, L=2]
    assert channel_reduce(y, "clip").tolist() == [[3.0, 4.0]]
    assert channel_reduce(y, "l1").tolist() == [[6.0, 6.0]]
    assert channel_reduce(y, "none").tolist() == [[0.0, 2.0]]
    torch.testing.assert_close(channel_reduce(y, "l2"), torch.tensor([[math.sqrt(14.0), math.sqrt(20.0)]]))


@pytest.mark.parametrize("norm", ["clip", "l1", "l2", "none"])
@pytest.mark.parametrize("source", ["both", "forward", "backward", "official_bwd_unflipped"])
def test_importance_is_positively_homogeneous_and_clipped_nonnegative(norm, source):
    g = torch.Generator().manual_seed(0)
    s = ssm_of(torch.randn(2, 16, 9, generator=g), torch.randn(2, 16, 9, generator=g))
    base = token_importance(s, norm, source)
    for a in (0.5, 3.0):
        scaled = token_importance(ssm_of(a * s.fwd, a * s.bwd_flipped), norm, source)
        torch.testing.assert_close(scaled, a * base, rtol=1e-6, atol=1e-6)
    if norm == "clip":
        assert (base >= 0).all() and (base > 0).any()


def test_both_sums_forward_and_reflipped_backward():
    g = torch.Generator().manual_seed(2)
    s = ssm_of(torch.randn(1, 8, 7, generator=g), torch.randn(1, 8, 7, generator=g))
    torch.testing.assert_close(token_importance(s), (s.fwd + s.bwd_flipped.flip(-1)).clamp(min=0).sum(1))
    # the official active path: xai_b.sum(dim=1), unclipped and in the flipped frame
    assert torch.equal(token_importance(s, "none", "official_bwd_unflipped"), s.bwd_flipped.sum(1))


@pytest.mark.parametrize("p", [0, 3, 10])
def test_flip_one_strong_token_ranks_at_its_own_position(p):
    L = 13
    g = torch.Generator().manual_seed(p)
    fwd, bwd = 0.1 * torch.randn(1, 8, L, generator=g), 0.1 * torch.randn(1, 8, L, generator=g)
    bwd[..., L - 1 - p] += 5.0  # the backward branch, computed on the flipped sequence, activates token p
    s = ssm_of(fwd, bwd)
    for source in ("both", "backward"):
        assert token_importance(s, "clip", source).argmax(-1).item() == p
    for norm in ("clip", "none"):
        assert token_importance(s, norm, "official_bwd_unflipped").argmax(-1).item() == L - 1 - p
    fwd2 = fwd.clone()
    fwd2[..., p] += 5.0
    assert token_importance(ssm_of(fwd2, 0.1 * bwd), "clip", "forward").argmax(-1).item() == p


# -- selection ---------------------------------------------------------------------------------------------------------
def test_selection_rules_on_a_hand_example():
    # 9 slots, CLS at 4 with the highest score (it must not count as a patch); n = 9 at 0.5: ceil(4) = 4 -> 5 kept
    s = torch.tensor([[9.0, 8.0, 7.0, 6.0, 100.0, 1.0, 2.0, 3.0, 0.0]])
    assert select_tokens(s, 4, 0.5, selection="global").keep.tolist() == [[0, 1, 2, 3, 4]]
    assert select_tokens(s, 4, 0.5, selection="balanced").keep.tolist() == [[0, 1, 4, 6, 7]]
    # official: the 4 best patches (0, 1, 2, 3), the CLS moved between the two halves
    official = select_tokens(s, 4, 0.5, selection="official")
    assert official.keep.tolist() == [[0, 1, 4, 2, 3]]
    with pytest.raises(ValueError, match="ascending"):
        check_reduction(official)
    alive = torch.tensor([[True, False, True, True, True, True, True, True, False]])  # 7 alive: ceil(3) = 3 kept
    assert select_tokens(s, 4, 0.5, alive=alive).keep.tolist() == [[0, 2, 4]]


def test_cls_is_excluded_in_every_row_and_rows_may_hold_it_anywhere():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(3, 21, generator=g)
    cls = torch.tensor([10, 7, 12])
    s[torch.arange(3), cls] = 10.0  # the official code excludes the CLS only in row 0
    red = select_tokens(s, cls, 0.5, selection="global")
    check_vim_reduction(red, cls)
    for b in range(3):
        row = red.keep[b].tolist()
        assert row.count(int(cls[b])) == 1 and len(row) == vim_keep_count(21, 0.5) == 11
        patches = [i for i in range(21) if i != cls[b]]
        best = sorted(patches, key=lambda i: -float(s[b, i]))[:10]
        assert sorted(best + [int(cls[b])]) == row


# -- the seam on a tiny Vim --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_keep_all_is_the_dense_model_bit_for_bit(alignment):
    with torch.no_grad():
        dense, dense_tokens = MODEL(X), MODEL.forward_tokens(X)
    for method in (ToPViM(keep_ratio=1.0, alignment=alignment), ToPViM(blocks=(), alignment=alignment)):
        logits, tokens, state = run(method)
        assert torch.equal(logits, dense) and torch.equal(tokens, dense_tokens)
        assert state.cls_index.tolist() == [CLS, CLS]
        for ids in state.kept.values():
            assert torch.equal(ids, torch.arange(65).expand(2, 65))
        assert all(not heat.isnan().any() for heat in state.importance.values())


@pytest.mark.parametrize("alignment, selection", [(a, s) for a in ALIGNMENTS for s in ("global", "balanced")]
                         + [("none", "official")])
def test_every_stage_keeps_an_odd_count_by_the_rule_with_the_cls(alignment, selection):
    _, tokens, state = run(ToPViM(alignment=alignment, selection=selection))
    assert list(state.kept) == [1, 3, 4]  # depth 6: the official 5, 10, 15 of 24 scaled
    n, before = 65, torch.arange(65).expand(2, 65)
    for ids in state.kept.values():
        k = vim_keep_count(n, 0.8)
        assert ids.shape == (2, k) and k % 2 == 1 and ids.dtype == torch.int64
        assert set(ids.flatten().tolist()) <= set(before.flatten().tolist())
        if selection == "official":  # the CLS in the middle of the sequence, the patches ascending around it
            assert (ids[:, k // 2] == CLS).all()
            patches = torch.cat([ids[:, :k // 2], ids[:, k // 2 + 1:]], 1)
            assert (patches[:, 1:] > patches[:, :-1]).all()
        else:
            assert (ids[:, 1:] > ids[:, :-1]).all() and (ids == CLS).any(1).all()
            # the step as a Reduction of the sequence it saw, with the layout protecting that sequence's CLS
            if alignment in PACKED:
                step = Reduction(torch.searchsorted(before.contiguous(), ids), before.shape[1])
                cls = (before == CLS).int().argmax(1)
            else:
                step, cls = Reduction(ids, 65), CLS
            check_vim_reduction(step, cls)
        if selection == "balanced":
            assert (ids[:, k // 2] == CLS).all()
        n, before = k, ids
    final = state.kept[4]
    if alignment in PACKED:
        assert tokens.shape == (2, 35, 32) and final[torch.arange(2), state.cls_index].tolist() == [CLS, CLS]
    else:
        assert tokens.shape == (2, 65, 32) and state.cls_index.tolist() == [CLS, CLS]
    assert state.tokens_per_block == [65, 53, 53, 43, 35, 35]
    assert state.slots_per_block == ([65, 53, 53, 43, 35, 35] if alignment in PACKED else [65] * 6)


def test_importance_maps_are_the_dense_scores_at_the_first_pruning_block():
    with torch.no_grad():
        _, ssm = MODEL.forward_tokens(X, return_ssm=True)
    for method in (ToPViM(), ToPViM.official()):
        _, _, state = run(method)
        first = token_importance(ssm[0], method.importance_norm, method.importance_source)
        assert torch.equal(state.importance[1], first)
        patches = [i for i in range(65) if i != CLS]
        for b in range(2):
            best = sorted(patches, key=lambda i: -float(first[b, i]))[:52]
            assert sorted(state.kept[1][b].tolist()) == sorted(best + [CLS])
        pruned = ~torch.zeros(2, 65, dtype=torch.bool).scatter_(1, state.kept[1], True)
        assert state.importance[3][pruned].isnan().all() and not state.importance[3][~pruned].isnan().any()


def record_blocks(model):
    """Forward hooks on every block: their (hidden, residual) outputs; returns (records, remover)."""
    records = []
    hooks = [layer.register_forward_hook(lambda m, a, out: records.append((out[0].detach(), out[1].detach())))
             for layer in model.layers]
    return records, lambda: [h.remove() for h in hooks]


@pytest.mark.parametrize("alignment", ["zero_slot", "decay_only"])
def test_pruned_slots_stay_exactly_zero_through_the_later_blocks(alignment):
    records, remove = record_blocks(MODEL)
    try:
        with torch.no_grad(), prunelab.apply(MODEL, ToPViM(alignment=alignment)) as h:
            tokens, state = MODEL.forward_tokens(X), h.state
    finally:
        remove()
    assert len(records) == 6
    for block, (hidden, residual) in enumerate(records, start=1):
        done = [b for b in state.kept if b < block]
        if not done:
            continue
        alive = torch.zeros(2, 65, dtype=torch.bool).scatter_(1, state.kept[done[-1]], True)
        # the block's output at its pruned slots (zeroed before it ran) is exactly 0, the kept ones are not
        assert torch.equal(hidden[~alive], torch.zeros_like(hidden[~alive]))
        assert torch.equal(residual[~alive], torch.zeros_like(residual[~alive]))
        assert hidden[alive].abs().amin(-1).min() > 0
    final_alive = torch.zeros(2, 65, dtype=torch.bool).scatter_(1, state.kept[4], True)
    assert torch.equal(tokens[~final_alive], torch.zeros_like(tokens[~final_alive]))  # norm_f(0) = 0


def test_aligned_outputs_differ_from_physical_removal_and_from_each_other():
    outs = {a: run(ToPViM(alignment=a, blocks=(2,))) for a in ALIGNMENTS}
    ids = outs["none"][2].kept[2]
    for a in ALIGNMENTS:  # one pruning block after the same dense prefix: the same kept tokens
        assert torch.equal(outs[a][2].kept[2], ids)
    rows = torch.arange(2)[:, None]
    physical = outs["none"][1]
    for a in ("zero_slot", "decay_only", "gapped"):
        kept = outs[a][1] if a == "gapped" else outs[a][1][rows, ids]
        assert (kept - physical).abs().max() > 0.05  # the position gap changes every kept token's scan
        assert not torch.allclose(outs[a][0], outs["none"][0], atol=1e-3)
    assert (outs["zero_slot"][1] - outs["decay_only"][1]).abs().max() > 1e-3  # decay_only drops the slots' input
    assert not torch.equal(outs["decay_only"][1][rows, ids], outs["gapped"][1])  # another step at the slots


def test_decay_only_passes_the_keep_mask_to_both_scans():
    torch.manual_seed(0)
    mixer = VimMixer(16, d_state=4)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    h = torch.randn(2, 11, 16)
    keep = torch.rand(2, 11, generator=torch.Generator().manual_seed(3)) > 0.4
    keep[:, 5] = True
    with torch.no_grad():
        out, ssm = mixer(h, return_ssm=True, keep=keep)
        dense, dense_ssm = mixer(h, return_ssm=True)
        all_kept = mixer(h, keep=torch.ones(2, 11, dtype=torch.bool))
        xz = mixer.in_proj(h).transpose(1, 2)
        torch.testing.assert_close(ssm.fwd, mixer._branch(xz, "", keep))
    assert torch.equal(all_kept, dense)
    for y in (ssm.fwd, ssm.bwd()):  # token order: the backward branch got the mask flipped with its sequence
        assert torch.equal(y.transpose(1, 2)[~keep], torch.zeros_like(y.transpose(1, 2)[~keep]))
        assert y.transpose(1, 2)[keep].abs().amax(-1).min() > 0
    assert not torch.allclose(ssm.bwd()[..., 5], dense_ssm.bwd()[..., 5], atol=1e-4)


def _gapped_setup(length: int = 13):
    torch.manual_seed(0)
    mixer = VimMixer(16, d_state=4)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    pos = torch.tensor([[0, 2, 3, 6, 9, 12], [1, 4, 5, 6, 7, 10]])  # gaps inside, at the start and at the end
    keep = torch.zeros(2, length, dtype=torch.bool).scatter_(1, pos, True)
    return mixer, keep, pos


def test_gapped_conv_equals_the_full_conv_with_zeros_in_the_gaps():
    from prunelab.methods.top_vim.vim import gapped_conv

    mixer, keep, pos = _gapped_setup()
    x = torch.randn(2, mixer.d_inner, keep.shape[1])
    with torch.no_grad():
        full = mixer.conv1d(torch.where(keep[:, None], x, 0.0))[..., :keep.shape[1]]
        packed = gapped_conv(mixer.conv1d, torch.stack([x[b][:, pos[b]] for b in range(2)]), pos)
    torch.testing.assert_close(packed, torch.stack([full[b][:, pos[b]] for b in range(2)]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("impl", ["loop", "parallel", "stepped"])
def test_gapped_equals_a_full_length_decay_only_scan_whose_pruned_slots_step_by_the_bias(impl):
    mixer, keep, pos = _gapped_setup()
    mixer.scan_impl = impl
    length = keep.shape[1]
    h = torch.randn(2, length, 16)

    def branch(xz, suffix, keep):  # the full-length decay-only branch, the pre-bias step zeroed at pruned slots
        conv, x_proj, dt_proj = (getattr(mixer, f"{n}{suffix}") for n in ("conv1d", "x_proj", "dt_proj"))
        x, z = xz.chunk(2, dim=1)
        x = F.silu(conv(x)[..., :length])
        dt, B, C = torch.split(x_proj(x.transpose(1, 2)), [mixer.dt_rank, 4, 4], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2) * keep[:, None]
        return selective_scan_ref(x, delta, -torch.exp(getattr(mixer, f"A{suffix}_log")), B.transpose(1, 2),
                                  C.transpose(1, 2), getattr(mixer, f"D{suffix}"), z=z, delta_bias=dt_proj.bias,
                                  delta_softplus=True, keep=keep)

    with torch.no_grad():
        packed = mixer(torch.stack([h[b][pos[b]] for b in range(2)]), positions=pos)
        xz = mixer.in_proj(torch.where(keep[..., None], h, 0.0)).transpose(1, 2)
        y = (branch(xz, "", keep) + branch(xz.flip(-1), "_b", keep.flip(-1)).flip(-1)) / 2
        ref = mixer.out_proj(y.transpose(1, 2))
    torch.testing.assert_close(packed, torch.stack([ref[b][pos[b]] for b in range(2)]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="positions"):
        mixer(h, keep=keep, positions=pos)


@pytest.mark.gpu
def test_gpu_gapped_model_runs_the_triton_scan_and_matches_the_cpu_path():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = vim_small(scan_impl="stepped").eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    method = ToPViM(alignment="gapped")
    cpu, _, cpu_state = run(method, model, x)
    gpu, _, gpu_state = run(method, model.cuda(), x.cuda())
    assert all(torch.equal(cpu_state.kept[b], gpu_state.kept[b].cpu()) for b in cpu_state.kept)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-3, rtol=2e-3)


def test_decay_only_equals_a_hand_written_masked_loop():
    method = ToPViM(alignment="decay_only")
    _, tokens, state = run(method)
    with torch.no_grad():
        hidden, residual, alive = MODEL.embed(X), None, None
        for block, layer in enumerate(MODEL.layers, start=1):
            hidden, residual = layer(hidden, residual, keep=alive)
            if block in state.kept:
                alive = torch.zeros(2, 65, dtype=torch.bool).scatter_(1, state.kept[block], True)
                hidden, residual = hidden * alive[..., None], residual * alive[..., None]
        assert torch.equal(MODEL.final_norm(hidden, residual), tokens)


@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_batch_of_two_equals_two_single_runs(alignment):
    method = ToPViM(alignment=alignment)
    logits, _, state = run(method)
    assert not torch.equal(state.kept[4][0], state.kept[4][1])
    for b in range(2):
        single, _, one = run(method, x=X[b:b + 1])
        torch.testing.assert_close(logits[b:b + 1], single, atol=1e-5, rtol=1e-4)
        for block in state.kept:
            assert torch.equal(state.kept[block][b:b + 1], one.kept[block])


# -- MACs -------------------------------------------------------------------------------------------------------------
def test_macs_count_kept_tokens_and_the_scans_visits_to_pruned_slots():
    dims = VimDims.from_model(MODEL)
    mixer = MODEL.layers[0].mixer
    # per token: every projection's weights once, the depthwise conv's taps, and 2 N d_inner per scan direction
    linears = sum(m.weight.numel() for m in mixer.modules() if isinstance(m, torch.nn.Linear))
    convs = mixer.conv1d.weight.numel() + mixer.conv1d_b.weight.numel()
    assert token_macs(dims) == linears + convs + 2 * 2 * 8 * 64
    dense = dense_macs(MODEL)
    assert dense == 64 * 48 * 32 + 6 * 65 * token_macs(dims) + 32 * 10
    for alignment in ALIGNMENTS:
        assert top_vim_macs(MODEL, ToPViM(keep_ratio=1.0, alignment=alignment)) == dense
        _, _, state = run(ToPViM(alignment=alignment))
        assert state.macs(MODEL) == top_vim_macs(MODEL, ToPViM(alignment=alignment))
    tokens = [65, 53, 53, 43, 35, 35]
    physical = top_vim_macs(MODEL, ToPViM(alignment="none"))
    assert physical == vim_macs(dims, tokens) < dense
    assert top_vim_macs(MODEL, ToPViM(alignment="gapped")) == physical  # a gap decays with the next token's step
    visits = sum(65 - n for n in tokens)
    for alignment in ("zero_slot", "decay_only"):
        assert top_vim_macs(MODEL, ToPViM(alignment=alignment)) == physical + visits * visit_macs(dims)
    assert visit_macs(dims) == 2 * 8 * 64


def test_vim_s_macs_match_the_cited_gflops():
    with torch.device("meta"):
        model = vim_small()
    dense, physical = dense_macs(model), top_vim_macs(model, ToPViM(alignment="none"))
    assert (round(dense / 1e9, 2), round(physical / 1e9, 2)) == (5.08, 3.57)  # cited: dense 5.08, EViT-style 3.57
    visits = 5 * 40 + 5 * 72 + 9 * 96  # pruned slots the later scans walk under alignment
    assert top_vim_macs(model, ToPViM()) - physical == visits * 2 * 16 * 768


# -- install, remove, training, errors --------------------------------------------------------------------------------
def fingerprint(model):
    hooks = tuple((n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules())
    attrs = tuple((n, tuple(sorted(vars(m)))) for n, m in model.named_modules())
    return hooks, attrs, {k: v.clone() for k, v in model.state_dict().items()}


def test_apply_twice_equals_once_and_remove_restores_the_model_bit_for_bit():
    model = tiny(seed=3)
    with torch.no_grad():
        dense, dense_features = model(X), model.forward_features(X)
    before = fingerprint(model)
    for method in (ToPViM(), ToPViM(alignment="none"), ToPViM.official()):
        with torch.no_grad(), prunelab.apply(model, method) as once:
            y1 = model(X)
            assert torch.equal(model.forward_features(X), model.forward_tokens(X)[torch.arange(2),
                                                                                    once.state.cls_index])
            assert torch.equal(model.head(model.forward_features(X)), y1)
            with prunelab.apply(model, method) as twice:
                y2 = model(X)
                assert all(torch.equal(twice.kept[b], once.kept[b]) for b in once.kept)
            y3 = model(X)
        assert torch.equal(y1, y2) and torch.equal(y1, y3) and not torch.allclose(y1, dense, atol=1e-4)
        after = fingerprint(model)
        assert after[:2] == before[:2] and all(torch.equal(after[2][k], v) for k, v in before[2].items())
        with torch.no_grad():
            assert torch.equal(model(X), dense) and torch.equal(model.forward_features(X), dense_features)
        assert prunelab.handle_of(model) is None


def test_training_mode_trains_through_the_kept_tokens_with_selection_outside_the_graph():
    model = tiny(seed=4).train()
    with torch.no_grad(), prunelab.apply(model.eval(), ToPViM()) as h:
        model(X)
        eval_kept = dict(h.kept)
    model.train()
    for alignment in ALIGNMENTS:
        model.zero_grad()
        with prunelab.apply(model, ToPViM(alignment=alignment)) as h:
            F.cross_entropy(model(X), torch.tensor([1, 7])).backward()
        assert all(not heat.requires_grad for heat in h.importance.values())
        if alignment == "zero_slot":
            assert all(torch.equal(h.kept[b], eval_kept[b]) for b in eval_kept)  # no dropout: the same selection
        for name in ("cls_token", "layers.0.mixer.in_proj.weight", "layers.5.mixer.x_proj_b.weight", "head.weight"):
            grad = model.get_parameter(name).grad
            assert grad is not None and grad.abs().sum() > 0, (alignment, name)


@pytest.mark.parametrize("settings, name", [
    ({"keep_ratio": 0.0}, "keep_ratio"), ({"keep_ratio": 1.5}, "keep_ratio"), ({"keep_ratio": "0.8"}, "keep_ratio"),
    ({"keep_ratio": True}, "keep_ratio"), ({"keep_ratio": float("nan")}, "keep_ratio"), ({"blocks": (0,)}, "blocks"),
    ({"blocks": (3, 3)}, "blocks"), ({"blocks": (4, 2)}, "blocks"), ({"blocks": (2.0,)}, "blocks"),
    ({"blocks": "5"}, "blocks"), ({"alignment": "naive"}, "alignment"), ({"importance_norm": "max"}, "importance_norm"),
    ({"importance_source": "flipped"}, "importance_source"), ({"selection": "top"}, "selection"),
    ({"selection": "official"}, "selection")])
def test_bad_settings_name_the_parameter(settings, name):
    with pytest.raises(ValueError, match=rf"^{name}"):
        ToPViM(**settings)


def test_bad_installs_name_the_parameter_and_leave_the_model_alone():
    model = tiny()
    with pytest.raises(ValueError, match="^blocks"):
        prunelab.apply(model, ToPViM(blocks=(2, 6)))  # the last block of 6 cannot prune
    with pytest.raises(ValueError, match="^alignment"):
        prunelab.apply(tiny(rms_norm=False), ToPViM())
    with pytest.raises(TypeError, match="^method"):
        prunelab.apply(model, DToP())
    assert prunelab.handle_of(model) is None and "forward" not in vars(model)
    with prunelab.apply(tiny(rms_norm=False), ToPViM(alignment="decay_only")):
        pass


# -- the random baseline ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_random_vim_runs_at_top_vims_budget_and_draws_per_image(alignment):
    from prunelab.methods.baselines import RandomVim

    top, rand = ToPViM(alignment=alignment), RandomVim(alignment=alignment)
    _, _, s_top = run(top)
    logits, _, s_rand = run(rand)
    assert s_rand.tokens_per_block == s_top.tokens_per_block and s_rand.slots_per_block == s_top.slots_per_block
    assert s_rand.macs(MODEL) == s_top.macs(MODEL)
    assert any(not torch.equal(s_rand.kept[b], s_top.kept[b]) for b in s_top.kept)
    for b in range(2):  # an image's draw does not depend on its batch, nor on the call
        single, _, one = run(rand, x=X[b:b + 1])
        torch.testing.assert_close(logits[b:b + 1], single, atol=1e-5, rtol=1e-4)
        assert all(torch.equal(s_rand.kept[k][b:b + 1], one.kept[k]) for k in s_rand.kept)
    _, _, other = run(RandomVim(alignment=alignment, seed=1))
    assert any(not torch.equal(other.kept[b], s_rand.kept[b]) for b in s_rand.kept)
    check_vim_reduction(Reduction(s_rand.kept[max(s_rand.kept)], 65), torch.full((2,), CLS), grid=None)


def test_random_vim_refuses_to_score_outside_the_seam():
    from prunelab.methods.baselines import RandomVim

    with torch.no_grad():
        _, ssm = MODEL.forward_tokens(X, return_ssm=True)
    with pytest.raises(RuntimeError, match="outside a forward"):
        RandomVim().importance(ssm[0])
