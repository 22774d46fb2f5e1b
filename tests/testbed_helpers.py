"""Helpers shared by the test-bed tests."""

from __future__ import annotations

import os

import pytest

from prunelab.reproductions.testbeds import fashion

NEEDS_FASHION_MNIST = pytest.mark.skipif(
    not os.path.isdir(fashion.DEFAULT_ROOT),
    reason=f"Fashion-MNIST not installed at {fashion.DEFAULT_ROOT} (apt-get install dataset-fashion-mnist)",
)
"""Skips a test (or, as ``pytestmark``, a module) where the Fashion-MNIST files the test-beds read are missing."""


def check_forward_through_seam(testbed, model, tok, kept_at_quarter: int) -> dict:
    """A VLM test-bed's batch of three held-out questions through ``model`` (a model of ``testbed``, the module that
    makes its inputs): every prompt carries the image's ``testbed.TOKENS`` placeholders, left padding, one score per
    choice of each question's kind; DivPrune through the seam keeps the dense logits with every token and
    ``kept_at_quarter`` tokens per image at budget 0.25. Returns the batch for further checks."""
    import torch

    import prunelab
    from prunelab import registry
    from prunelab.reproductions.testbeds import composites as C

    data = C.make_dataset("test", 3, seed=0)
    x = testbed.batch(data.samples, data.scenes, tok)
    assert ((x["input_ids"] == testbed.IMAGE_TOKEN).sum(-1) == testbed.TOKENS).all()
    assert bool((x["attention_mask"][:, -1] == 1).all())  # left padding
    inputs = testbed.model_inputs(x)
    with torch.no_grad():
        dense = model(**inputs, logits_to_keep=1).logits
        scores = testbed.choice_logits(dense, x["kind"], tok)
        assert [s.numel() for s in scores] == [len(C.CHOICES[k]) for k in x["kind"]]
        entry = registry.get("divprune")
        with prunelab.apply(model, entry.build(model, budget=1.0)):
            kept = model(**inputs, logits_to_keep=1).logits
        torch.testing.assert_close(kept, dense, atol=1e-4, rtol=1e-4)
        with prunelab.apply(model, entry.build(model, budget=0.25)) as h:
            model(**inputs, logits_to_keep=1)
    assert [k.numel() for k in h.state.kept] == [kept_at_quarter] * 3
    return x
