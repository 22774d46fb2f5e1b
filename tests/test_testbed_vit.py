"""The ViT test-bed: IDX files, preprocessing, 197 tokens, deterministic training, the shipped weights and loader."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os

import numpy as np
import pytest
import torch
from testbed_helpers import NEEDS_FASHION_MNIST

from prunelab.reproductions.testbeds import fashion as data
from prunelab.reproductions.testbeds import vit
from prunelab.reproductions.testbeds.vit import ViTConfig, _augment

# Small enough to train a few steps in about a second; still the 56 px / 4 px layout with 197 tokens.
TINY = ViTConfig(embed_dim=16, depth=2, num_heads=1, phases=((28, 128), (56, 128)), batch_size=64)


def write_idx(path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_split(root, split: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    img_name, lbl_name = data.FILES[split]
    write_idx(os.path.join(root, img_name), images, data.IMAGES_MAGIC)
    write_idx(os.path.join(root, lbl_name), labels, data.LABELS_MAGIC)
    return images, labels


def test_idx_parsing_round_trip(tmp_path):
    images, labels = write_split(tmp_path, "test", 7)
    x, y = data.load_fashion_mnist("test", str(tmp_path))
    assert x.shape == (7, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (7,) and y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(images)) and torch.equal(y, torch.from_numpy(labels).long())


def test_idx_bad_magic(tmp_path):
    path = tmp_path / "bad.gz"
    write_idx(path, np.zeros((3, 28, 28)), data.LABELS_MAGIC)  # images under the labels' magic number
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(str(path), data.IMAGES_MAGIC)


def test_missing_root_message(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        data.load_fashion_mnist("train", str(missing))
    msg = str(err.value)
    assert str(missing / "train-images-idx3-ubyte.gz") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--data DIR" in msg


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        data.load_fashion_mnist("validation")


def test_preprocess_shape_and_scale():
    x = data.preprocess(torch.full((3, 28, 28), 255, dtype=torch.uint8))
    assert x.shape == (3, 1, 56, 56) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.full_like(x, (1.0 - data.MEAN) / data.STD))


def test_deit_like_token_grid():
    model = vit.build(TINY).eval()
    assert model.patch_embed.num_patches == 196 and model.num_prefix_tokens == 1
    with torch.no_grad():
        tokens = model.forward_features(torch.zeros(2, 1, 56, 56))
    assert tokens.shape == (2, 197, TINY.embed_dim)


def test_augment_keeps_shape_and_is_seeded():
    x = data.preprocess(torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8))
    a = _augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, _augment(x, torch.Generator().manual_seed(0)))


def test_shipped_config_is_deit_tiny():
    cfg = ViTConfig()
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio) == (192, 12, 3, 4.0)
    assert cfg.img_size // cfg.patch_size == 14


def test_train_save_load_round_trip(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    write_split(root, "train", 256, seed=1)
    write_split(root, "test", 64, seed=2)
    model, info = vit.train(TINY, data_root=str(root), progress=False)
    assert info["images_seen"] == 256 and info["steps"] == 4 and 0 <= info["test_top1"] <= 100
    # The low-resolution phase must leave the standard 197-token forward path in place.
    assert not model.dynamic_img_size and model.patch_embed.strict_img_size
    # The weights are evaluated as they ship: already fp16-exact.
    assert all(torch.equal(t, t.half().float()) for t in model.state_dict().values())

    path = tmp_path / "vit.safetensors"
    digest = vit.save(model, info, path)
    assert digest == vit.sha256(path)
    again, info2 = vit.load(path)
    assert info2 == json.loads(json.dumps(info)) and not again.training and again.embed_dim == TINY.embed_dim
    x = data.preprocess(torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), again(x))

    # Training is deterministic: a second run reproduces the same weights.
    fresh, _ = vit.train(TINY, data_root=str(root), progress=False)
    with torch.no_grad():
        assert torch.equal(fresh(x), again(x))


def test_mimetic_init_shapes_attention_as_the_paper_prescribes():
    cfg = ViTConfig(embed_dim=24, depth=2, num_heads=3)
    model = vit.build(cfg)
    vit.mimetic_init(model, 0.7, 0.7, 0.4, 0.4, gen=torch.Generator().manual_seed(0))
    d, k = cfg.embed_dim, cfg.embed_dim // cfg.num_heads
    for blk in model.blocks:
        w = blk.attn.qkv.weight
        for h in range(cfg.num_heads):
            qk = w[h * k : (h + 1) * k].T @ w[d + h * k : d + (h + 1) * k]  # W_q W_k^T of head h, [d, d]
            off = qk - torch.diag(qk.diag())
            assert qk.diag().mean() > 0.1 and qk.diag().mean() > 3 * off.abs().mean()
        vo = w[2 * d :].T @ blk.attn.proj.weight.T  # W_v W_o, full rank: a2 Z - b2 I exactly
        assert vo.diag().mean().item() == pytest.approx(-0.4, abs=0.1)
    pe = model.pos_embed[0]
    assert torch.equal(pe[0], torch.zeros(d))  # the class token's entry
    # 2-D sine-cosine over the 14 x 14 grid: neighbours are more alike than distant patches.
    near, far = (pe[1] * pe[2]).sum(), (pe[1] * pe[196]).sum()
    assert near > far
    again = vit.build(cfg)
    vit.mimetic_init(again, 0.7, 0.7, 0.4, 0.4, gen=torch.Generator().manual_seed(0))
    mine = {k: v for k, v in again.state_dict().items() if "attn" in k and "weight" in k or k == "pos_embed"}
    assert len(mine) == 1 + 2 * cfg.depth and all(torch.equal(v, model.state_dict()[k]) for k, v in mine.items())


def test_mimetic_bf16_recipe_trains_and_round_trips(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    write_split(root, "train", 128, seed=1)
    write_split(root, "test", 32, seed=2)
    cfg = dataclasses.replace(TINY, phases=((28, 64), (56, 64)), mimetic=(0.7, 0.7, 0.4, 0.4), bf16=True)
    model, info = vit.train(cfg, data_root=str(root), progress=False)
    assert info["config"]["mimetic"] == (0.7, 0.7, 0.4, 0.4) and info["config"]["bf16"] is True
    path = tmp_path / "vit.safetensors"
    vit.save(model, info, path)
    again, info2 = vit.load(path)
    assert info2["config"]["mimetic"] == [0.7, 0.7, 0.4, 0.4] and info2["config"]["bf16"] is True
    x = data.preprocess(torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), again(x))

    # A file written before the recipe had these fields loads too, as trained without them.
    from safetensors.torch import load_file, save_file

    old = dict(info, config={k: v for k, v in info["config"].items() if k not in ("mimetic", "bf16")})
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata={"info": json.dumps(old)})
    before, _ = vit.load(tmp_path / "old.safetensors")
    with torch.no_grad():
        assert torch.equal(before(x), again(x))


def test_command_line_overrides(capsys):
    parser = argparse.ArgumentParser()
    cfg = vit._config(["lr=5e-4", "phases=[[28, 100], [56, 10]]", "mimetic=[0.7, 0.7, 0.4, 0.4]", "bf16=true"], parser)
    assert cfg.lr == 5e-4 and cfg.phases == ((28, 100), (56, 10)) and cfg.mimetic == (0.7, 0.7, 0.4, 0.4) and cfg.bf16
    assert vit._config([], parser) == ViTConfig()
    with pytest.raises(SystemExit):
        vit._config(["learning_rate=1e-3"], parser)
    assert "no ViTConfig field 'learning_rate'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        vit._config(["lr=fast"], parser)
    assert "'lr=fast': the value must be JSON" in capsys.readouterr().err


def test_loader_refusals(tmp_path):
    with pytest.raises(FileNotFoundError, match="path: no test-bed weights"):
        vit.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(1)}, str(bare))
    with pytest.raises(ValueError, match="carries no training info"):
        vit.load(bare)


def test_shipped_weights_checksum():
    assert vit.WEIGHTS.is_file(), "the ViT test-bed weights must ship with the package"
    assert vit.sha256(vit.WEIGHTS) == vit.SHA256


@NEEDS_FASHION_MNIST
def test_shipped_weights_load_and_classify():
    model, info = vit.load()
    assert info["test_top1"] >= 88.0 and info["config"]["embed_dim"] == 192
    assert [s["test_top1"] for s in (info["init"]["init"], info["init"])] == [83.42, 83.99]  # stages 1 and 2
    images, labels = data.load_fashion_mnist("test")
    x = data.preprocess(images[:200])
    with torch.no_grad():
        accuracy = (model(x).argmax(-1) == labels[:200]).float().mean().item()
    assert accuracy > 0.7  # far above the 0.1 of chance on 200 held-out images


@NEEDS_FASHION_MNIST
def test_real_fashion_mnist_test_split():
    x, y = data.load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert torch.equal(torch.bincount(y), torch.full((10,), 1000))
    assert len(data.CLASSES) == 10


def test_continuation_starts_from_init_and_records_stage1(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    write_split(root, "train", 128, seed=1)
    write_split(root, "test", 32, seed=2)
    first, _ = vit.train(dataclasses.replace(TINY, phases=((28, 64), (56, 64))), data_root=str(root), progress=False)
    x = data.preprocess(torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8))
    # At a zero learning rate (AdamW's decay scales with it) continuing changes nothing: the weights come from init.
    still, _ = vit.train(dataclasses.replace(TINY, phases=((56, 64),), lr=0.0, seed=1), data_root=str(root),
                         progress=False, init=first)
    with torch.no_grad():
        assert torch.equal(still(x), first.eval()(x))
    with pytest.raises(ValueError, match="init: its architecture"):
        vit.train(dataclasses.replace(TINY, embed_dim=32), data_root=str(root), progress=False, init=first)

    # The command line: stage 2 from a stage-1 file records that file's SHA-256 and test accuracy.
    path1, path2 = tmp_path / "s1.safetensors", tmp_path / "s2.safetensors"
    vit.save(first, {"config": dataclasses.asdict(TINY), "test_top1": 12.5}, path1)
    tiny = [f"{k}={json.dumps(v)}" for k, v in
            {"embed_dim": 16, "depth": 2, "num_heads": 1, "batch_size": 64, "phases": [[28, 64], [56, 64]]}.items()]
    argv = ["--stage", "2", "--init", str(path1), "--data", str(root), "--out", str(path2)]
    info = vit.main(argv + [a for item in tiny for a in ("--set", item)])
    assert info["init"]["sha256"] == vit.sha256(path1) and info["init"]["test_top1"] == 12.5
    assert info["config"]["seed"] == vit.STAGE2.seed and info["config"]["lr"] == vit.STAGE2.lr
    # --stage 3 from that file: the recorded chain reaches back to stage 1.
    path3 = tmp_path / "s3.safetensors"
    info3 = vit.main(["--stage", "3", "--init", str(path2), "--data", str(root), "--out", str(path3)]
                     + [a for item in tiny for a in ("--set", item)])
    assert info3["config"]["seed"] == vit.STAGE3.seed and info3["config"]["lr"] == vit.STAGE3.lr
    assert info3["init"]["sha256"] == vit.sha256(path2) and info3["init"]["init"]["sha256"] == vit.sha256(path1)
    assert vit.load(path2)[1]["init"]["sha256"] == vit.sha256(path1)


def test_shipped_recipe_stages_and_command_line_refusals(capsys):
    assert vit.STAGES[0] == ViTConfig() and len({cfg.seed for cfg in vit.STAGES}) == len(vit.STAGES)
    assert all(cfg.mimetic is None and cfg.phases[-1][0] == cfg.img_size for cfg in vit.STAGES[1:])
    for argv in (["--stage", "2"], ["--stage", "3"], ["--init", "x.safetensors"], ["--stage", "1", "--init", "x"]):
        with pytest.raises(SystemExit):
            vit.main(argv)
        assert "--init FILE goes with --stage N for N > 1" in capsys.readouterr().err
