"""The tiny VLM test-bed's model and prompts (reproductions/testbeds/vlm.py): the word-level vocabulary and one-token
answers, the patch-to-cell map, batches, a forward of the real LLaVA class with a VLM method installed through the
seam; the shipped weights (checksum, loader, held-out accuracy) and the region probe."""

from __future__ import annotations

import functools

import pytest
import torch
from testbed_helpers import NEEDS_FASHION_MNIST, check_forward_through_seam

import prunelab
from prunelab.reproductions.testbeds import composites as C
from prunelab.reproductions.testbeds import vlm

pytestmark = NEEDS_FASHION_MNIST


@functools.cache
def _built():
    return vlm.build()


def test_every_answer_is_one_token():
    _, tokenizer = _built()
    ids = vlm.answer_ids(tokenizer)
    words = {w for choices in C.CHOICES.values() for w in choices}
    assert set(ids) == words and len(set(ids.values())) == len(words)  # distinct tokens


def test_every_question_word_is_in_the_vocabulary():
    tok = vlm.tokenizer()
    for templates in ("train", "heldout"):
        data = C.make_dataset("test", 200, seed=3, templates=templates)
        for s in data.samples:
            ids = tok(vlm.PROMPT.format(question=s.question)).input_ids
            assert vlm.UNK not in ids and vlm.IMAGE_TOKEN not in ids, s.question
    assert tok("<image>").input_ids == [vlm.IMAGE_TOKEN] and tok.pad_token_id == vlm.PAD


def test_patch_cells_follow_the_grid():
    cells = vlm.patch_cells()
    assert cells.shape == (vlm.TOKENS,) == (144,)
    assert torch.bincount(cells).tolist() == [16] * 9  # 4 x 4 patches per 28 px cell
    assert cells[0] == 0 and cells[11] == 2 and cells[12 * 4] == 3 and cells[-1] == 8


@torch.no_grad()
def test_batch_and_forward_through_the_seam():
    model, tokenizer = _built()
    check_forward_through_seam(vlm, model, tokenizer, kept_at_quarter=36)


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


@pytest.mark.slow
def test_question_training_loss_falls():
    from prunelab.reproductions.testbeds.train_vlm import pretrain_tower, train_questions

    model, _ = vlm.build(seed=1)
    heads = pretrain_tower(model.model.vision_tower, steps=2, batch_size=8, scenes=500, log_every=0)
    losses = train_questions(model, heads, steps=60, batch_size=16, scenes=2000, log_every=0)
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)  # from ln(vocabulary) towards the answer priors
    assert not model.training


@pytest.mark.slow
def test_reading_stage_loss_falls_and_keeps_the_tower():
    from prunelab.reproductions.testbeds.train_vlm import train_reading

    model, _ = vlm.load(base=True)
    tower = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    words = model.get_input_embeddings().weight.detach().clone()
    losses = train_reading(model, steps=120, batch_size=16, scenes=400, log_every=0)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.95 * first, (first, last)  # 1.12 -> 1.02 when written
    assert all(torch.equal(v, model.model.vision_tower.state_dict()[k]) for k, v in tower.items())
    assert model.get_input_embeddings().weight.norm(dim=-1).mean() > 20 * words.norm(dim=-1).mean()
    assert not model.training


def test_question_batch_marks_each_location_answer_with_its_cell():
    """Stage C's routing aid reads ``asked``: every location question's answer position, and the cell it names."""
    import numpy as np

    from prunelab.reproductions.testbeds.train_vlm import question_batch

    tok = vlm.tokenizer()
    data = C.make_dataset("train", 6, seed=5)
    x = question_batch(data.scenes, np.arange(6), np.random.default_rng(0), 8, tok, pixels=False)
    answers = {tuple(r[:2]) for r in x["targets"].tolist()}
    assert 0 < len(x["asked"]) < len(answers) and all((b, p) in answers for b, p, _ in x["asked"].tolist())
    for b, p, cell in x["asked"].tolist():
        start = max(i for i in range(p) if x["input_ids"][b, i - 1:i + 1].tolist() == tok("question :").input_ids)
        question = " ".join(tok.convert_ids_to_tokens(x["input_ids"][b, start + 1:p + 1].tolist()))
        assert f" {C.POSITIONS[cell]} " in question and question.endswith("answer :"), (question, cell)
    assert x["asked"].dtype == torch.long


def test_routing_aid_refuses_a_layer_the_model_lacks():
    from prunelab.reproductions.testbeds.train_vlm import train_reading

    model, _ = _built()
    for layer in (-1, 4):
        with pytest.raises(ValueError, match="route_layer"):
            train_reading(model, steps=1, scenes=10, route_layer=layer)


@pytest.mark.slow
def test_routing_aid_learns_the_asked_cell(capsys):
    """With ``route``, the answer position learns to hold the asked cell (printed as the aid's accuracy)."""
    from prunelab.reproductions.testbeds.train_vlm import train_reading

    model, _ = vlm.load(base=True)
    train_reading(model, steps=240, batch_size=16, scenes=400, route=1.0, log_every=40)
    read = [float(line.rsplit("read at ", 1)[1].split()[0]) for line in capsys.readouterr().out.splitlines()
            if "read at" in line]
    assert read[-1] > read[0] + 0.2, read


def test_cached_forward_equals_the_model_from_pixels():
    """Stage C's training path (cached tower features, padded prompts) gives the full model's logits."""
    from prunelab.reproductions.testbeds.train_vlm import cache_features

    model, tok = _trained()
    data = C.make_dataset("test", 3, seed=4, kinds=("presence", "relation"))
    x = vlm.batch(data.samples, data.scenes, tok)
    with torch.no_grad():
        full = model(**vlm.model_inputs(x)).logits
        h = vlm.cached_forward(model, x["input_ids"], cache_features(model, data.scenes).float(),
                               attention_mask=x["attention_mask"]).last_hidden_state
    valid = x["attention_mask"].bool()
    torch.testing.assert_close(model.lm_head(h)[valid], full[valid], atol=0.05, rtol=0.02)  # bf16 features


def test_shipped_weights_match_their_checksum():
    for path, digest in ((vlm.WEIGHTS, vlm.SHA256), (vlm.BASE_WEIGHTS, vlm.BASE_SHA256)):
        assert path.is_file(), "the trained test-bed weights must ship with the repo"
        assert vlm.sha256(path) == digest
        assert path.stat().st_size < 20e6


def test_loader_refuses_other_weights(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad), metadata={"vocabulary": "a\nb"})
    with pytest.raises(ValueError, match="path"):
        vlm.load(bad)
    with pytest.raises(FileNotFoundError, match="path"):
        vlm.load(tmp_path / "missing.safetensors")


@functools.cache
def _trained():
    return vlm.load()


@torch.no_grad()
def test_trained_model_reads_its_image():
    """Every kind far above its majority answer on held-out composites (presence 50 %, count 49 %, location and
    relation about 20 %; the recorded accuracies are in reproductions/testbeds/README.md), and the answer's own cell
    matters more than as many random tokens."""
    from prunelab.reproductions.testbeds.train_vlm import evaluate
    from prunelab.reproductions.vlm_bench.bench import region_probe

    model, _ = _trained()
    data = C.make_dataset("test", 240, seed=11)
    acc = evaluate(model, data)
    assert acc["presence"] > 0.8 and acc["count"] > 0.7, acc
    assert acc["location"] > 0.35 and acc["relation"] > 0.35, acc
    rows = {r["tokens"]: r for r in region_probe(model, data, batch_size=64, seed=0)}
    assert rows["intact"]["location"] == pytest.approx(acc["location"])
    assert rows["region removed"]["location"] < rows["random removed"]["location"] - 0.15, rows


def test_bench_runs_on_a_few_questions(tmp_path):
    from prunelab.reproductions.vlm_bench.bench import run_bench

    out = run_bench(tmp_path, ("random_prune", "divprune"), budgets=(0.25,), n=8, speed_batch=2, rounds=1,
                    compose=("divprune",))
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == {"dense", "random", "DivPrune", "random + late random", "DivPrune + late random"}
    assert rows["DivPrune"]["visual_%"] == pytest.approx(100 * 36 / 144)
    assert rows["DivPrune"]["lm_macs_%"] < 50 and rows["DivPrune"]["bound"] > 1
    assert "vs_random" in rows["DivPrune"] and "vs_random" not in rows["random"]
    # the composition: 36 tokens in LLM layers 0-1, 18 in layers 2-3; compared with random + the same late drop
    for name in ("random + late random", "DivPrune + late random"):
        assert rows[name]["visual_%"] == pytest.approx(100 * (36 + 36 + 18 + 18) / 4 / 144)
        assert rows[name]["lm_macs_%"] < rows["DivPrune"]["lm_macs_%"] and rows[name]["speedup"] > 0
    assert "vs_random" in rows["DivPrune + late random"] and "vs_random" not in rows["random + late random"]
    for name in ("bench.json", "bench.md", "region.json", "region.md", "bench.png"):
        assert (tmp_path / name).is_file()
    assert "speed" not in out and not (tmp_path / "speed.md").exists()  # --speed only on request


@torch.no_grad()
def test_drop_tokens_removes_exactly_the_given_tokens():
    from prunelab.reproductions.vlm_bench.region import DropTokens, cell_tokens

    model, tokenizer = _built()
    data = C.make_dataset("test", 2, seed=0)
    x = vlm.batch(data.samples, data.scenes, tokenizer)
    inputs = vlm.model_inputs(x)
    drop = (cell_tokens((0,), vlm.patch_cells()), cell_tokens((4, 8), vlm.patch_cells()))
    assert len(drop[0]) == 16 and len(drop[1]) == 32
    with prunelab.apply(model, DropTokens(drop)) as h:
        model(**inputs, logits_to_keep=1)
    for kept, gone in zip(h.state.kept, drop):
        assert kept.numel() == 144 - len(gone) and not set(kept.flatten().tolist()) & set(gone)
    with pytest.raises(ValueError, match="drop"):
        with prunelab.apply(model, DropTokens((tuple(range(144)), ()))):
            model(**inputs, logits_to_keep=1)


def test_bench_is_a_reproduction_with_one_preset(tmp_path):
    from prunelab.cli import main
    from prunelab.registry import reproducible

    assert "vlm_bench" in reproducible()
    with pytest.raises(SystemExit, match="one preset"):
        main(["reproduce", "vlm_bench", "--preset", "full", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="methods"):
        from prunelab.reproductions.vlm_bench.bench import run_bench

        run_bench(tmp_path, ("dense",), n=8)
    with pytest.raises(ValueError, match="compose"):
        run_bench(tmp_path, ("divprune",), compose=("dense",), n=8)
