"""The vision-Mamba test-bed's training code: the low-resolution phase, a short run, saving and loading (the trained
weights do not ship yet)."""

from __future__ import annotations

import pytest
import torch

from prunelab.reproductions.testbeds import vim
from prunelab.reproductions.testbeds.fashion import load_fashion_mnist, preprocess

SMALL = vim.VimBedConfig(embed_dim=32, depth=2, d_state=4, phases=((28, 64), (56, 32)), batch_size=16)


def test_low_res_at_full_size_is_the_model_and_leaves_nothing_behind():
    torch.manual_seed(0)
    model = vim.build(SMALL).eval()
    x = torch.randn(2, 1, 56, 56)
    with torch.no_grad():
        dense = model(x)
        with vim.low_res(model, 56):
            same = model(x)
    torch.testing.assert_close(same, dense, atol=1e-5, rtol=1e-5)  # bicubic resampling onto its own grid
    assert "embed" not in vars(model) and "forward_features" not in vars(model)


def test_low_res_runs_28_px_and_trains_the_full_position_embedding():
    torch.manual_seed(0)
    model = vim.build(SMALL)
    with vim.low_res(model, 28):
        out = model(torch.randn(3, 1, 28, 28))
        out.sum().backward()
    assert out.shape == (3, 10)
    grad = model.pos_embed.grad[0]
    assert grad[98].abs().sum() > 0 and (grad.abs().sum(-1) > 0).float().mean() > 0.9  # the CLS entry and the grid


def test_a_short_curriculum_trains_and_round_trips(tmp_path):
    model, info = vim.train(SMALL, progress=False)
    assert info["images_seen"] == 96 and info["phases"] == [[28, 64], [56, 32]]
    path = tmp_path / "vim.safetensors"
    vim.save(model, info, path)
    loaded, meta = vim.load(path)
    x = preprocess(load_fashion_mnist("test")[0][:4])
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta["config"]["embed_dim"] == 32


def test_bad_phases_and_missing_weights_are_named():
    with pytest.raises(ValueError, match="phases"):
        vim.train(SMALL, phases=((28, 32),), progress=False)
    with pytest.raises(FileNotFoundError, match="train them"):
        vim.load()
