"""HiPrune's model-free part: attention received, anchors/buffers/registers, budgets, official quirks."""

from __future__ import annotations

import pytest
import torch

from prunelab.common.reduction import Reduction, check_reduction
from prunelab.methods.hiprune import (
    HiPrune,
    Role,
    anchor_count,
    buffer_tokens,
    hiprune_partition,
    hiprune_select,
    merge_unit_scores,
    received_attention,
)

GRID = (6, 6)
N = 36


def rand_scores(b=1, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, generator=g, dtype=torch.float64), torch.rand(b, n, generator=g, dtype=torch.float64)


def as_set(mask, row=0):
    return set(mask[row].nonzero().flatten().tolist())


# The hand-checked case on a 6x6 grid (index = 6 * row + col):
#   5 = (0, 5) top-right corner, 17 = (2, 5) right edge, 30 = (5, 0) bottom-left corner,
#   20 = (3, 2) and 21 = (3, 3) adjacent, so each is the other's neighbour but stays an anchor.
ANCHORS = {5, 17, 20, 21, 30}
BUFFERS = {
    4, 11,  # of 5: left, down (no up, no right: corner)
    16, 23,  # of 17: left, down; up is 11 again; no 18 (that is the next row's first token)
    24, 31,  # of 30: up, right (no down, no 29 on the previous row's end)
    14, 26, 19,  # of 20: up, down, left; right is anchor 21
    15, 27, 22,  # of 21: up, down, right; left is anchor 20
}
# The official flat indexing adds: 6 (5 + 1 wraps), 0 (5 - 6 clamped), 18 (17 + 1 wraps),
# 29 (30 - 1 wraps) and 35 (30 + 6 clamped).
OFFICIAL_EXTRA = {0, 6, 18, 29, 35}


def hand_scores():
    mid = torch.linspace(0.0, 0.5, N, dtype=torch.float64)[None]  # all below the anchors' 10
    mid[0, sorted(ANCHORS)] = 10.0
    deep = -torch.arange(N, dtype=torch.float64)[None]  # registers prefer low indices
    deep[0, 5] = deep[0, 4] = 100.0  # an anchor and a buffer the deep layer likes best: never re-chosen
    return mid, deep


# --- the partition, by hand ------------------------------------------------------------------------------

def test_partition_by_hand_on_a_6x6_grid():
    mid, deep = hand_scores()
    # budget 25, alpha 1: 25 * 1 / 5 = 5 anchors; 5 + 12 buffers = 17; 8 registers
    p = hiprune_partition(mid, deep, GRID, 25, anchor_ratio=1.0)
    assert as_set(p.anchor) == ANCHORS
    assert as_set(p.buffer) == BUFFERS
    free = sorted(set(range(N)) - ANCHORS - BUFFERS)
    assert as_set(p.register) == set(free[:8]) == {0, 1, 2, 3, 6, 7, 8, 9}
    keep = p.keep
    assert keep.dtype == torch.int64 and keep[0].tolist() == sorted(ANCHORS | BUFFERS | set(free[:8]))
    roles = dict(zip(keep[0].tolist(), p.roles[0].tolist()))
    assert {i for i, r in roles.items() if r == Role.ANCHOR} == ANCHORS
    assert {i for i, r in roles.items() if r == Role.BUFFER} == BUFFERS
    assert {i for i, r in roles.items() if r == Role.REGISTER} == {0, 1, 2, 3, 6, 7, 8, 9}


def test_official_quirks_by_hand_wrap_and_clamp():
    mid, deep = hand_scores()
    p = hiprune_partition(mid, deep, GRID, 25, anchor_ratio=1.0, official_quirks=True)
    assert as_set(p.anchor) == ANCHORS  # round(5.0) = 5 in both modes
    assert as_set(p.buffer) == BUFFERS | OFFICIAL_EXTRA
    assert as_set(p.register) == {1, 2, 3}  # 25 - 22; 0 is now a (clamped) buffer
    assert set(hiprune_select(mid, deep, GRID, 25, anchor_ratio=1.0)[0].tolist()) != set(p.keep[0].tolist())


def test_buffer_tokens_at_each_edge():
    def buffers(anchor, official=False):
        a = torch.zeros(1, N, dtype=torch.bool)
        a[0, anchor] = True
        return as_set(buffer_tokens(a, GRID, official_quirks=official))

    assert buffers(0) == {1, 6}  # top-left corner
    assert buffers(35) == {34, 29}  # bottom-right corner
    assert buffers(11) == {10, 5, 17}  # right edge: no 12
    assert buffers(12) == {13, 6, 18}  # left edge: no 11
    assert buffers(14) == {13, 15, 8, 20}  # interior
    assert buffers(0, True) == {1, 6}  # 0 - 1 and 0 - 6 both clamp to 0, the anchor itself
    assert buffers(35, True) == {34, 29}
    assert buffers(11, True) == {10, 12, 5, 17}
    assert buffers(12, True) == {11, 13, 6, 18}
    assert buffers(3, True) == {2, 4, 9, 0}
    assert buffers(32, True) == {31, 33, 26, 35}


def test_non_square_grid_and_single_row():
    a = torch.zeros(1, 12, dtype=torch.bool)
    a[0, 3] = True  # grid 3x4: (0, 3), a row end
    assert as_set(buffer_tokens(a, (3, 4))) == {2, 7}
    assert as_set(buffer_tokens(a, (3, 4), official_quirks=True)) == {0, 2, 4, 7}
    assert as_set(buffer_tokens(a, (1, 12))) == {2, 4}
    assert as_set(buffer_tokens(a, (1, 12), official_quirks=True)) == {0, 2, 4, 11}


# --- anchor count ----------------------------------------------------------------------------------------

def test_anchor_count_matches_the_paper_settings_and_documents_rounding():
    # round(N' * alpha / 5), official rule: alpha = 0.1 gives 4 / 3 / 1 anchors at N' = 192 / 128 / 64, in both modes
    for budget, n_a in ((192, 4), (128, 3), (64, 1)):
        assert anchor_count(budget, 0.1) == anchor_count(budget, 0.1, official_quirks=True) == n_a
    # half-way cases: ours rounds half up, the official round() half to even
    assert (anchor_count(125, 0.1), anchor_count(125, 0.1, official_quirks=True)) == (3, 2)
    assert (anchor_count(25, 0.1), anchor_count(25, 0.1, official_quirks=True)) == (1, 0)
    assert anchor_count(3, 0.1) == 1 and anchor_count(3, 0.1, official_quirks=True) == 0
    assert anchor_count(100, 0.0) == 0  # registers only


def test_official_anchor_rounding_changes_the_selection():
    mid, deep = rand_scores()
    ours = hiprune_partition(mid, deep, GRID, 25)
    official = hiprune_partition(mid, deep, GRID, 25, official_quirks=True)
    assert int(ours.anchor.sum()) == 1 and int(official.anchor.sum()) == 0
    assert int(official.buffer.sum()) == 0
    assert as_set(official.register) == set(torch.topk(deep[0], 25).indices.tolist())
    assert int(ours.kept.sum()) == int(official.kept.sum()) == 25


# --- budgets and the kept-token contract -----------------------------------------------------------------

@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 1.0])
def test_budget_is_exact_for_every_budget(official, alpha):
    mid, deep = rand_scores(3, seed=1)
    for budget in range(1, N + 1):
        p = hiprune_partition(mid, deep, GRID, budget, anchor_ratio=alpha, official_quirks=official)
        check_reduction(Reduction(p.keep, N))
        assert p.keep.shape == (3, budget)
        assert not (p.anchor & p.buffer).any() and not (p.anchor & p.register).any()
        assert not (p.buffer & p.register).any()
        n_a = anchor_count(budget, alpha, official_quirks=official)
        assert (p.anchor.sum(1) == n_a).all()


def test_budget_equal_to_n_keeps_every_token():
    mid, deep = rand_scores(2)
    for official in (False, True):
        keep = hiprune_select(mid, deep, GRID, N, official_quirks=official)
        assert torch.equal(keep, torch.arange(N).expand(2, -1))


def test_tiny_budget_keeps_the_anchor_and_its_best_buffers():
    mid = torch.zeros(1, N, dtype=torch.float64)
    mid[0, 14] = 5.0  # interior anchor: 4 neighbours 8, 13, 15, 20
    mid[0, 20], mid[0, 8] = 3.0, 2.0
    deep = torch.rand(1, N, dtype=torch.float64)
    p = hiprune_partition(mid, deep, GRID, 3)
    assert as_set(p.anchor) == {14} and as_set(p.buffer) == {20, 8} and not p.register.any()


def test_registers_are_the_top_deep_scores_outside_anchors_and_buffers():
    mid, deep = rand_scores(4, seed=3)
    for official in (False, True):
        p = hiprune_partition(mid, deep, GRID, 20, anchor_ratio=0.5, official_quirks=official)
        for b in range(4):
            taken = p.anchor[b] | p.buffer[b]
            k = 20 - int(taken.sum())
            expected = torch.topk(deep[b].masked_fill(taken, -1.0), k).indices
            assert as_set(p.register, b) == set(expected.tolist())
            assert (deep[b][p.register[b]].min() >= deep[b][~taken & ~p.register[b]].max())


def test_batch_equals_per_sample():
    mid, deep = rand_scores(5, seed=4)
    for official in (False, True):
        batched = hiprune_partition(mid, deep, GRID, 17, anchor_ratio=0.6, official_quirks=official)
        for b in range(5):
            single = hiprune_partition(mid[b:b + 1], deep[b:b + 1], GRID, 17, anchor_ratio=0.6,
                                       official_quirks=official)
            assert torch.equal(batched.keep[b:b + 1], single.keep)
            assert torch.equal(batched.roles[b:b + 1], single.roles)


def official_reference(mid, deep, width, budget, alpha):
    """The official algorithm (HiPrune ``encode_images`` in ``LLaVA/llava/model/llava_arch.py``), one image, on
    flat indices: +-1 and +-W offsets clamped to [0, N - 1]."""
    n = mid.numel()
    anchors = torch.topk(mid, round(budget * alpha / 5)).indices
    ab = torch.cat([anchors + d for d in (0, -1, 1, -width, width)]).clamp(0, n - 1).unique()
    if ab.numel() > budget:
        return None  # the official code fails here (negative k)
    # the official exclusion: subtract 1, which excludes exactly while scores lie in [0, 1)
    registers = torch.topk(deep - torch.zeros(n, dtype=deep.dtype).index_fill(0, ab, 1.0), budget - ab.numel())
    return torch.cat([ab, registers.indices]).sort().values


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_official_quirks_match_the_flat_index_reference(alpha):
    mid, deep = rand_scores(6, seed=7)
    compared = 0
    for budget in range(1, N + 1):
        keep = hiprune_select(mid, deep, GRID, budget, anchor_ratio=alpha, official_quirks=True)
        for b in range(6):
            ref = official_reference(mid[b], deep[b], GRID[1], budget, alpha)
            if ref is not None:
                assert keep[b].tolist() == ref.tolist()
                compared += 1
    assert compared > 150


def test_ties_go_to_the_lower_index():
    flat = torch.zeros(1, N, dtype=torch.float64)
    p = hiprune_partition(flat, flat, GRID, 8, anchor_ratio=1.0)  # 2 anchors
    assert as_set(p.anchor) == {0, 1} and as_set(p.buffer) == {2, 6, 7}
    assert as_set(p.register) == {3, 4, 5}


# --- valid mask (padded canvas) --------------------------------------------------------------------------

def test_valid_region_equals_selection_on_the_cropped_grid():
    mid, deep = rand_scores(2, seed=5)
    valid = torch.ones(2, N, dtype=torch.bool)
    valid[1] = False
    valid[1].view(6, 6)[:4, :4] = True  # sample 1 is a 4x4 image at the top-left of the 6x6 canvas
    p = hiprune_partition(mid, deep, GRID, 10, anchor_ratio=1.0, valid=valid)
    assert not (p.kept & ~valid).any()
    crop = lambda s: s[1].view(6, 6)[:4, :4].reshape(1, 16)  # noqa: E731
    ref = hiprune_partition(crop(mid), crop(deep), (4, 4), 10, anchor_ratio=1.0)
    to_canvas = lambda i: 6 * (i // 4) + i % 4  # noqa: E731
    assert p.keep[1].tolist() == [to_canvas(i) for i in ref.keep[0].tolist()]
    assert torch.equal(p.roles[1], ref.roles[0])
    assert torch.equal(p.keep[0], hiprune_select(mid[:1], deep[:1], GRID, 10, anchor_ratio=1.0)[0])


# --- synthetic attention maps, no model weights -----------------------------------------------------------

def synthetic_attention(b, heads, n_prefix, j_star, seed=0):
    """Softmax maps [B, H, T, T] on a 6x6 grid (plus prefix) where patch j_star receives the most."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, heads, n_prefix + N, n_prefix + N, generator=g, dtype=torch.float64)
    logits[..., n_prefix + j_star] += 6.0
    return logits.softmax(-1)


@pytest.mark.parametrize("n_prefix", [0, 1])
def test_dominant_column_keeps_it_and_its_four_neighbours(n_prefix):
    # a dominant object-layer column: j* = 15 = (2, 3) is interior; 64-ish budgets give one anchor
    attn = synthetic_attention(2, 3, n_prefix, 15)
    mid = received_attention(attn, n_prefix)
    deep = received_attention(synthetic_attention(2, 3, n_prefix, 0, seed=1), n_prefix)
    p = hiprune_partition(mid, deep, GRID, 12)
    for b in range(2):
        assert as_set(p.anchor, b) == {15} and as_set(p.buffer, b) == {9, 14, 16, 21}


def test_dominant_border_column_reproduces_official_clamping():
    # the same with the official flat indexing: anchor 2 = (0, 2) in the top row adds the clamped token 0
    mid = received_attention(synthetic_attention(1, 2, 1, 2), 1)
    deep = torch.zeros(1, N, dtype=torch.float64)
    assert as_set(hiprune_partition(mid, deep, GRID, 5, anchor_ratio=1.0).buffer) == {1, 3, 8}
    official = hiprune_partition(mid, deep, GRID, 5, anchor_ratio=1.0, official_quirks=True)
    assert as_set(official.buffer) == {0, 1, 3, 8}


def test_received_attention_is_the_cls_free_column_mean():
    attn = synthetic_attention(2, 4, 1, 7)
    g = received_attention(attn, 1)
    assert g.dtype == torch.float32 and g.shape == (2, N)
    assert torch.allclose(g.double(), attn.mean(dim=(1, 2))[:, 1:], atol=1e-6)  # float32 accumulation
    # every query row sums to 1, so the column means over all T columns sum to 1; the CLS share is dropped
    assert torch.allclose(g.double().sum(-1), 1 - attn.mean(dim=(1, 2))[:, 0], atol=1e-6)
    cls = received_attention(attn, 1, query="cls")
    assert torch.allclose(cls.double(), attn[:, :, 0, 1:].mean(1), atol=1e-6)
    assert torch.allclose(received_attention(attn, 0).sum(-1), torch.ones(2), atol=1e-5)


def test_merge_unit_mean_maps_back_to_raster_order():
    # Qwen2.5-VL merge units: a 4x4 patch grid with value 10 * row + col, laid out merge-unit-major like Qwen2.5-VL
    patch = torch.tensor([[10.0 * r + c for c in range(4)] for r in range(4)])
    unit_major = patch.view(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(1, 16)  # (h/2, w/2, 2, 2)
    merged = merge_unit_scores(unit_major, 4)
    raster = patch.view(2, 2, 2, 2).mean(dim=(1, 3)).reshape(1, 4)  # the 2x2 block means, raster order
    assert torch.equal(merged, raster) and merged.tolist() == [[5.5, 7.5, 25.5, 27.5]]


# --- the method object ------------------------------------------------------------------------------------

def test_method_defaults_and_budget_conversion():
    m = HiPrune()
    assert (m.budget, m.anchor_ratio, m.blocks) == (192, 0.1, (8, -2))
    assert HiPrune(encoder="qwen2_5_vl").blocks == (15, -1)
    assert HiPrune(encoder="qwen2_5_vl", object_block=3).blocks == (3, -1)
    assert HiPrune(budget=0.5).budget_for(25) == 13  # round half up (keep_count)
    assert HiPrune(budget=0.5, official_quirks=True).budget_for(25) == 12  # Python round: half to even
    assert HiPrune(budget=1.0).budget_for(N) == N


def test_method_select_equals_the_function():
    mid, deep = rand_scores(3, seed=6)
    m = HiPrune(budget=0.5, anchor_ratio=1.0, official_quirks=True)
    expected = hiprune_select(mid, deep, GRID, 18, anchor_ratio=1.0, official_quirks=True)
    assert torch.equal(m.select(mid, deep, GRID), expected)
    valid = torch.ones(3, N, dtype=torch.bool)
    valid[:, 30:] = False  # 30 valid tokens in every row: the ratio applies to them
    assert m.partition(mid, deep, GRID, valid).keep.shape == (3, 15)


# --- bad inputs name the parameter ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    (dict(budget=0), "budget"), (dict(budget=N + 1), "budget"), (dict(budget=2.5), "budget"),
    (dict(budget=True), "budget"), (dict(grid=(5, 6)), "grid"), (dict(grid=(6,)), "grid"),
    (dict(grid=(-6, -6)), "grid"), (dict(anchor_ratio=1.5), "anchor_ratio"), (dict(anchor_ratio=-0.1), "anchor_ratio"),
    (dict(valid=torch.ones(1, N)), "valid"), (dict(valid=torch.zeros(1, N, dtype=torch.bool)), "budget"),
])
def test_bad_arguments_raise_naming_the_parameter(kwargs, name):
    mid, deep = rand_scores()
    args = dict(grid=GRID, budget=4) | kwargs
    with pytest.raises(ValueError, match=name):
        hiprune_select(mid, deep, args.pop("grid"), args.pop("budget"), **args)


def test_bad_scores_raise_naming_the_parameter():
    mid, deep = rand_scores()
    bad = mid.clone()
    bad[0, 3] = float("nan")
    with pytest.raises(ValueError, match="mid_scores"):
        hiprune_select(bad, deep, GRID, 4)
    with pytest.raises(ValueError, match="deep_scores"):
        hiprune_select(mid, bad, GRID, 4)
    with pytest.raises(ValueError, match="mid_scores"):
        hiprune_select(mid[0], deep[0], GRID, 4)
    with pytest.raises(ValueError, match="deep_scores"):
        hiprune_select(mid, deep[:, :30], GRID, 4)
    with pytest.raises(ValueError, match="mid_scores"):
        hiprune_select(torch.ones(1, N, dtype=torch.long), deep, GRID, 4)
    with pytest.raises(ValueError, match="attn"):
        received_attention(torch.rand(2, 5, 5))
    with pytest.raises(ValueError, match="query"):
        received_attention(torch.rand(1, 1, 5, 5), 0, query="cls")
    with pytest.raises(ValueError, match="num_prefix"):
        received_attention(torch.rand(1, 1, 5, 5), 5)
    with pytest.raises(ValueError, match="unit"):
        merge_unit_scores(torch.rand(1, 10), 4)


@pytest.mark.parametrize("kwargs, name", [
    (dict(budget=0), "budget"), (dict(budget=1.5), "budget"), (dict(budget=float("nan")), "budget"),
    (dict(budget=False), "budget"), (dict(anchor_ratio=2.0), "anchor_ratio"), (dict(encoder="siglip"), "encoder"),
    (dict(object_block="9"), "object_block"), (dict(deep_block=1.0), "deep_block"),
    (dict(official_quirks="yes"), "official_quirks"),
])
def test_method_validation_names_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        HiPrune(**kwargs)


def test_method_budget_errors_name_budget_and_valid():
    mid, deep = rand_scores()
    with pytest.raises(ValueError, match="budget"):
        HiPrune().select(mid, deep, GRID)  # 192 > 36
    valid = torch.ones(2, N, dtype=torch.bool)
    valid[1, 0] = False
    mid2, deep2 = rand_scores(2)
    with pytest.raises(ValueError, match="valid"):
        HiPrune(budget=0.5).select(mid2, deep2, GRID, valid)
