"""The shared ViT core: kept-token contract, timm seam (apply/remove), FLOPs and schedules."""

from __future__ import annotations

import pytest
import timm
import torch

import prunelab
from prunelab.common.flops import ViTDims, vit_gflops, vit_macs
from prunelab.common.reduction import Reduction
from prunelab.common.schedule import TokenSchedule, default_prune_blocks
from prunelab.common.tokens import gather_tokens, keep_count, topk_sorted
from prunelab.common.vit import AttentionRecorder, AttnRequest, ViTPlan, vit_layout

MODELS = ["deit_tiny_patch16_224", "deit_small_distilled_patch16_224", "vit_tiny_patch16_224.augreg_in21k_ft_in1k"]


def small(name: str, **kw):
    # Random weights, a smaller image so each forward is fast; the token layout is the real one.
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=96, **kw).eval()


ALL_STATS = AttnRequest(probs=True, keys=True, received=True)


class DropLast:
    """Drops the last patch token at block 1: a minimal pruner to test the seam."""

    def vit_plan(self, dims, layout):
        return ViTPlan({1: AttnRequest()},
                       lambda b, x, s: Reduction(torch.arange(x.shape[1] - 1).expand(x.shape[0], -1), x.shape[1]))


# --- tokens -----------------------------------------------------------------------------------------

def test_keep_count_rounds_half_up_and_validates():
    assert keep_count(197, 0.5) == 99 and keep_count(10, 0.35) == 4 and keep_count(10, 0.34) == 3
    assert keep_count(5, 1e-9) == 1 and keep_count(7, 1.0) == 7
    for bad in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match="keep_ratio"):
            keep_count(10, bad)


def test_gather_tokens_per_batch_row():
    x = torch.randn(3, 7, 5)
    keep = torch.tensor([[0, 2, 4], [0, 1, 6], [0, 5, 6]])
    got = gather_tokens(x, keep)
    for b in range(3):
        torch.testing.assert_close(got[b], x[b, keep[b]])
    # the inverse is Reduction.scatter (tests/test_reduction.py)
    red = Reduction(keep, 7)
    back = red.scatter(torch.zeros_like(x), got)
    torch.testing.assert_close(gather_tokens(back, keep), got)
    torch.testing.assert_close(back.abs().sum(), got.abs().sum())  # nothing else was written


def test_topk_sorted_is_sorted_unique_and_deterministic_on_ties():
    s = torch.tensor([[0.5, 0.5, 0.1, 0.5, 0.9]])
    assert topk_sorted(s, 3).tolist() == [[0, 1, 4]]
    assert topk_sorted(s, 2, largest=False).tolist() == [[0, 2]]


# --- timm seam ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_layout_is_read_from_the_model(name):
    layout = vit_layout(small(name))
    distilled = "distilled" in name
    assert layout.num_prefix == (2 if distilled else 1)
    assert layout.class_positions == ((0, 1) if distilled else (0,))
    assert layout.grid == (6, 6)


def test_register_tokens_are_protected_prefix():
    m = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, reg_tokens=4, no_embed_class=True)
    layout = vit_layout(m)
    assert layout.num_prefix == 5 and layout.class_positions == (0,)


@pytest.mark.parametrize("name", MODELS)
def test_stats_path_with_all_tokens_kept_equals_dense(name):
    model, x = small(name), torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        dense = model(x)
        method = AttentionRecorder((1, 3), ALL_STATS)
        with prunelab.apply(model, method):
            out = model(x)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=0)
    stats = method.stats[1]
    n = 36 + model.num_prefix_tokens
    assert stats.probs.shape == (2, model.blocks[1].attn.num_heads, n, n)
    torch.testing.assert_close(stats.probs.sum(-1), torch.ones(stats.probs.shape[:-1]))
    torch.testing.assert_close(stats.received, stats.probs.sum(-2))
    assert stats.keys.shape[-2:] == (n, model.blocks[1].attn.head_dim)


def test_only_requesting_blocks_leave_the_fused_path():
    model = small("deit_tiny_patch16_224")
    with prunelab.apply(model, AttentionRecorder((2,), ALL_STATS)):
        overridden = [i for i, b in enumerate(model.blocks) if "forward" in vars(b.attn)]
    assert overridden == [2]
    assert all(b.attn.fused_attn == timm.layers.use_fused_attn() for b in model.blocks)


def test_received_through_kernel_matches_explicit_softmax():
    model, x = small("deit_tiny_patch16_224"), torch.randn(2, 3, 96, 96)
    both, only = AttentionRecorder((2,), ALL_STATS), AttentionRecorder((2,), AttnRequest(received=True))
    with torch.no_grad():
        with prunelab.apply(model, both):
            model(x)
        with prunelab.apply(model, only):
            model(x)
    assert only.stats[2].probs is None
    torch.testing.assert_close(only.stats[2].received, both.stats[2].received, atol=1e-5, rtol=1e-5)


def test_apply_twice_equals_once_and_remove_restores_bit_for_bit():
    model, x = small("deit_tiny_patch16_224"), torch.randn(2, 3, 96, 96)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        dense = model(x)
        method = DropLast()
        once = prunelab.apply(model, method)
        y1 = model(x)
        twice = prunelab.apply(model, method)  # stacked: the first waits, uninstalled, below the second
        y2 = model(x)
        assert once.suspended and not twice.suspended
        assert len(model.blocks[1]._forward_hooks) == 1
        torch.testing.assert_close(y1, y2, atol=0, rtol=0)
        assert twice.state.tokens_per_block == [36]
        twice.remove()
        twice.remove()  # idempotent
        assert len(model.blocks[1]._forward_hooks) == 1 and torch.equal(model(x), y1)  # the first is back
        once.remove()
        assert torch.equal(model(x), dense)
    assert not model.blocks[1]._forward_hooks and not model.blocks[0]._forward_pre_hooks
    assert all("forward" not in vars(b.attn) for b in model.blocks)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_unsupported_models_raise_naming_model():
    with pytest.raises(prunelab.UnsupportedModelError, match="model"):
        prunelab.apply(torch.nn.Linear(3, 3), DropLast())
    swin = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64)
    swin.blocks[0].attn = torch.nn.Identity()
    with pytest.raises(prunelab.UnsupportedModelError, match="model: block 0"):
        prunelab.apply(swin, DropLast())


def test_method_without_vit_adapter_is_rejected():
    with pytest.raises(TypeError, match="method"):
        prunelab.apply(small("deit_tiny_patch16_224"), object())


# --- FLOPs and schedules ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, gflops", [
    ("deit_tiny_patch16_224", 1.3), ("deit_small_patch16_224", 4.6), ("deit_base_patch16_224", 17.6),
])
def test_dense_gflops_match_the_papers(name, gflops):
    dims = ViTDims.from_timm(timm.create_model(name, pretrained=False))
    assert round(vit_gflops(dims), 1) == gflops


def test_analytic_flops_match_torch_flop_counter_on_a_pruned_model():
    from torch.utils.flop_counter import FlopCounterMode

    model, x = small("deit_tiny_patch16_224"), torch.randn(2, 3, 96, 96)
    for blk in model.blocks:
        blk.attn.fused_attn = False  # so the counter sees the attention matmuls
    from prunelab.methods.baselines import RandomDrop

    method = RandomDrop(schedule=TokenSchedule((1, 4), (9, 7)))
    with prunelab.apply(model, method) as handle, FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    tokens = handle.plan.tokens_per_block
    assert tokens == [37, 37, 28, 28, 28, 21, 21, 21, 21, 21, 21, 21]
    assert counter.get_total_flops() == 2 * 2 * vit_macs(ViTDims.from_timm(model), tokens)


def test_schedule_for_gflops_hits_the_target_from_below():
    dims = ViTDims.from_timm(timm.create_model("deit_small_patch16_224", pretrained=False))
    sched = TokenSchedule.for_gflops(dims, 3.0)
    got = vit_gflops(dims, sched.tokens_per_block(12, 197))
    assert sched.blocks == default_prune_blocks(12) == (2, 5, 8)
    assert 2.95 < got <= 3.0
    with pytest.raises(ValueError, match="gflops"):
        TokenSchedule.for_gflops(dims, 0.01)


def test_schedule_validation_names_the_parameter():
    with pytest.raises(ValueError, match="schedule"):
        TokenSchedule((2, 5), (10,))
    with pytest.raises(ValueError, match="schedule: block 2 removes 196"):
        TokenSchedule((2,), (196,)).validate(12, 197, 1)
