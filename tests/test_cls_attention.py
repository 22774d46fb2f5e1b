"""CLSAttention, the class-token attention baseline of the ViT family: what it keeps and what it refuses."""

from __future__ import annotations

import pytest
import timm
import torch

import prunelab
from prunelab.common.flops import ViTDims
from prunelab.common.handle import UnsupportedModelError
from prunelab.common.vit import AttnStats, vit_layout
from prunelab.methods.baselines import CLSAttention


def model(**kw):
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64, **kw).eval()


def test_keeps_the_tokens_the_class_token_attends_to_most():
    m = model()  # 16 patches + CLS
    plan = CLSAttention(keep_ratio=0.5, blocks=(1,)).vit_plan(ViTDims.from_timm(m), vit_layout(m))
    assert plan.requests[1].probs
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(2, 3, 17, 17, generator=g).softmax(-1)
    reduction = plan.select(1, torch.randn(2, 17, 192), AttnStats(probs=probs))
    cls_row = probs[:, :, 0, 1:].mean(dim=1)
    expected = cls_row.topk(8, dim=-1).indices.sort(dim=-1).values + 1
    assert torch.equal(reduction.keep[:, 0], torch.zeros(2, dtype=torch.long))
    assert torch.equal(reduction.keep[:, 1:], expected)


def test_prunes_a_real_forward_and_restores_the_model():
    m = model()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        dense = m(x)
        with prunelab.apply(m, CLSAttention(keep_ratio=0.5, blocks=(3, 7))) as handle:
            pruned = m(x)
        assert handle.plan.tokens_per_block[-1] < 17
        assert pruned.shape == dense.shape and not torch.allclose(pruned, dense)
        torch.testing.assert_close(m(x), dense, rtol=0, atol=0)


def test_needs_a_class_token():
    m = model(class_token=False, global_pool="avg")
    with pytest.raises(UnsupportedModelError, match="class token"):
        with prunelab.apply(m, CLSAttention(keep_ratio=0.5)):
            pass
