"""The tiny VLM test-bed's model and prompts (reproductions/testbeds/vlm.py): one-token answers, the patch-to-cell
map, batches, and a forward of the real LLaVA class with a VLM method installed through the seam."""

from __future__ import annotations

import functools
import os

import pytest
import torch

import prunelab
from prunelab import registry
from prunelab.reproductions.testbeds import composites as C
from prunelab.reproductions.testbeds import fashion, vlm

pytestmark = pytest.mark.skipif(not os.path.isdir(fashion.DEFAULT_ROOT),
                                reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@functools.cache
def _built():
    return vlm.build()


def test_every_answer_is_one_token():
    _, tokenizer = _built()
    ids = vlm.answer_ids(tokenizer)
    words = {w for choices in C.CHOICES.values() for w in choices}
    assert set(ids) == words and len(set(ids.values())) == len(words)  # distinct tokens


def test_patch_cells_follow_the_grid():
    cells = vlm.patch_cells()
    assert cells.shape == (vlm.TOKENS,) == (144,)
    assert torch.bincount(cells).tolist() == [16] * 9  # 4 x 4 patches per 28 px cell
    assert cells[0] == 0 and cells[11] == 2 and cells[12 * 4] == 3 and cells[-1] == 8


@torch.no_grad()
def test_batch_and_forward_through_the_seam():
    model, tokenizer = _built()
    data = C.make_dataset("test", 3, seed=0)
    x = vlm.batch(data.samples, data.scenes, tokenizer)
    assert ((x["input_ids"] == vlm.IMAGE_TOKEN).sum(-1) == vlm.TOKENS).all()
    assert bool((x["attention_mask"][:, -1] == 1).all())  # left padding
    inputs = {k: x[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    dense = model(**inputs, logits_to_keep=1).logits
    scores = vlm.choice_logits(dense, x["kind"], tokenizer)
    assert [s.numel() for s in scores] == [len(C.CHOICES[k]) for k in x["kind"]]
    entry = registry.get("divprune")
    with prunelab.apply(model, entry.build(model, budget=1.0)):
        kept = model(**inputs, logits_to_keep=1).logits
    torch.testing.assert_close(kept, dense, atol=1e-4, rtol=1e-4)
    with prunelab.apply(model, entry.build(model, budget=0.25)) as h:
        model(**inputs, logits_to_keep=1)
    assert [k.numel() for k in h.state.kept] == [36] * 3


@pytest.mark.slow
def test_tower_pretraining_loss_falls():
    import transformers as tf

    from prunelab.reproductions.testbeds.train_vlm import evaluate_tower, pretrain_tower

    torch.manual_seed(0)
    tower = tf.CLIPVisionModel(tf.CLIPVisionConfig(**{k: v for k, v in vlm.TOWER.items() if k != "model_type"}))
    heads = pretrain_tower(tower, steps=60, batch_size=32, scenes=2000, log_every=0)
    first, last = sum(heads.losses[:5]) / 5, sum(heads.losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    metrics = evaluate_tower(tower, heads, n=100)
    assert metrics["cell_index"] > 0.9 and metrics["cell"] > 0.5, metrics
