"""The vision-Mamba test-bed: the low-resolution phase, a short run with its refine cycle, saving and loading, and the
shipped weights (checksums, held-out accuracy)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from prunelab.reproductions.testbeds import shipped, vim
from prunelab.reproductions.testbeds.fashion import load_fashion_mnist, preprocess

BASE_TOP1_FLOOR = 70.0
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
    loaded, meta = vim.load(path=path)
    x = preprocess(load_fashion_mnist("test")[0][:4])
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta["config"]["embed_dim"] == 32


def test_the_refine_cycle_adds_its_images_and_records_them():
    cfg = dataclasses.replace(SMALL, phases=((28, 32), (56, 16)), refine=((56, 16),))
    model, info = vim.train_base(cfg, progress=False)
    assert info["images_seen"] == 64 and info["refine"]["images_seen"] == 16 and info["refine"]["lr"] == cfg.refine_lr
    assert vim._config(json.loads(json.dumps(info["config"]))) == cfg


def test_bad_phases_stages_and_missing_weights_are_named(tmp_path):
    with pytest.raises(ValueError, match="phases"):
        vim.train(SMALL, phases=((28, 32),), progress=False)
    with pytest.raises(FileNotFoundError, match="train them"):
        vim.load("base", tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="stage"):
        vim.load("final")


@pytest.mark.parametrize("stage", list(vim.WEIGHTS))
def test_shipped_weights_match_their_checksum(stage):
    assert shipped.sha256(vim.WEIGHTS[stage]) == vim.SHA256[stage]


def test_a_wrong_checksum_is_refused(monkeypatch):
    monkeypatch.setitem(vim.SHA256, "base", "0" * 64)
    with pytest.raises(ValueError, match="SHA-256"):
        vim.load("base")


def test_the_shipped_vim_classifies_held_out_images():
    model, info = vim.load("base")
    images, labels = load_fashion_mnist("test")
    top1 = 100 * vim.hits(model, images[:300], labels[:300]).float().mean().item()
    assert top1 > BASE_TOP1_FLOOR and info["test_top1"] > BASE_TOP1_FLOOR  # chance: 10 %
    assert info["refine"]["images_seen"] == 9_000 and info["test_images"] == 10_000
    tuned, tuned_info = vim.load("ft_top")
    assert tuned_info["base_sha256"] == vim.SHA256["base"] and tuned_info["images_seen"] == vim.FINETUNE_IMAGES
