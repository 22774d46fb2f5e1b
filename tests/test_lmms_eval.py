"""The lmms-eval path of the VLM full presets, offline: tiny model vlm_folders with real processors, a synthetic task.

``PrunedVLM`` (no lmms-eval needed): keeping every token answers exactly like the dense model; a padded batch
answers like per-question runs; teacher-forced log-likelihoods line up with the pruned rows; bad inputs name
their parameter. Then lmms-eval itself (the ``eval`` extra): the entry point registers ``prunelab``, the full
preset's command runs dense / method / random on the ``prunelab_shapes`` task, and keep-all equals dense there.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from prunelab.common.tiny_vlm import FAMILIES
from prunelab.reproductions.vlm_eval import PrunedVLM, load_vlm, make_vlm_method
from prunelab.reproductions.vlm_full import parse_budget, parse_method_args
from prunelab.reproductions.vlm_offline import shapes_doc_to_visual, shapes_docs, write_shapes_task

HIPRUNE_BLOCK = {"llava": 0, "llava_next": 0, "qwen2_5_vl": 1}  # the tiny towers' shallow block (vlm_tiny)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_shapes_task(tmp_path_factory.mktemp("tasks"), n=6)


def _questions(n: int):
    docs = shapes_docs(n, seed=3)
    # different question lengths, so the batch is padded
    return [d["question"] + " please" * i for i, d in enumerate(docs)], [shapes_doc_to_visual(d) for d in docs]


def _method(name, model, family, budget):
    extra = {"object_block": HIPRUNE_BLOCK[family], "keep_newlines": True} if name == "hiprune" else {}
    return make_vlm_method(name, model, budget=budget, **extra)


def _divprune_vlm(folder, family):
    """A freshly loaded model with DivPrune at keep ratio 0.25 (its own copy: nothing to remove afterwards)."""
    model, processor = load_vlm(str(folder), dtype="float32")
    return PrunedVLM(model, processor, _method("divprune", model, family, 0.25))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["divprune", "hiprune"])
def test_keep_all_answers_like_dense(vlm_folders, family, name):
    model, processor = load_vlm(str(vlm_folders[family]), dtype="float32")
    qs, ims = _questions(3)
    dense = PrunedVLM(model, processor)
    want = dense.generate(qs, ims, max_new_tokens=5)
    want_ll = dense.loglikelihood(qs[0], " yes", ims[0])
    vlm = PrunedVLM(model, processor, _method(name, model, family, 1.0))
    try:
        assert vlm.generate(qs, ims, max_new_tokens=5) == want
        got_ll = vlm.loglikelihood(qs[0], " yes", ims[0])
    finally:
        vlm.remove()
    assert got_ll[1] == want_ll[1] and math.isclose(got_ll[0], want_ll[0], rel_tol=1e-5, abs_tol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_matches_per_question(vlm_folders, family):
    vlm, (qs, ims) = _divprune_vlm(vlm_folders[family], family), _questions(3)
    batch = vlm.generate(qs, ims, max_new_tokens=4)
    single = [vlm.generate([q], [im], max_new_tokens=4)[0] for q, im in zip(qs, ims)]
    kept = [k.numel() for k in vlm.handle.state.kept]
    assert batch == single
    assert len(kept) == 1 and kept[0] >= 1  # the last forward was one image, pruned


@pytest.mark.parametrize("family", FAMILIES)
def test_loglikelihood_of_greedy_answer_is_greedy(vlm_folders, family):
    vlm, (qs, ims) = _divprune_vlm(vlm_folders[family], family), _questions(1)
    answer = vlm.generate(qs, ims, max_new_tokens=3)[0]
    logp, greedy = vlm.loglikelihood(qs[0], " " + answer, ims[0])
    other = vlm.loglikelihood(qs[0], " " + answer + " red red", ims[0])
    assert greedy and logp < 0 and math.isfinite(logp)
    assert other[0] < logp  # more tokens, lower probability


def test_text_only_questions_run_dense(vlm_folders):
    model, processor = load_vlm(str(vlm_folders["llava"]), dtype="float32")
    qs, ims = _questions(2)
    dense = PrunedVLM(model, processor)
    want = dense.generate(["is there a red square?"], [[]], max_new_tokens=4)[0]
    want_ll = dense.loglikelihood("is there a red square?", " yes", [])
    vlm = PrunedVLM(model, processor, _method("divprune", model, "llava", 0.25))
    mixed = vlm.generate([qs[0], "is there a red square?", qs[1]], [ims[0], [], ims[1]], max_new_tokens=4)
    assert mixed[1] == want  # the text-only question answered densely, in its place in the batch
    assert mixed[0] == vlm.generate([qs[0]], [ims[0]], max_new_tokens=4)[0]  # the method is back on
    assert vlm.handle is not None and len(vlm.handle.state.kept) == 1
    assert vlm.loglikelihood("is there a red square?", " yes", []) == want_ll


def test_bad_inputs_name_the_parameter(vlm_folders, tmp_path):
    model, processor = load_vlm(str(vlm_folders["llava"]), dtype="float32")
    with pytest.raises(ValueError, match="method"):
        make_vlm_method("fastv", model)
    with pytest.raises(ValueError, match="method"):
        make_vlm_method("dense", model, budget=4)
    with pytest.raises(ValueError, match="budget"):
        make_vlm_method("divprune", model, budget=0)
    with pytest.raises(ValueError, match="object_block"):
        make_vlm_method("random_prune", model, budget=4, object_block=0)
    with pytest.raises(ValueError, match="dtype"):
        load_vlm(str(vlm_folders["llava"]), dtype="int8")
    vlm = PrunedVLM(model, processor)
    with pytest.raises(ValueError, match="images"):
        vlm.generate(["a", "b"], [[]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        vlm.generate(["a"], [[]], max_new_tokens=0)
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pretrained"):
        load_vlm(str(tmp_path))


def test_budget_and_method_args_parsing():
    assert parse_budget("64") == 64 and isinstance(parse_budget("64"), int)
    assert parse_budget("0.098") == 0.098 and isinstance(parse_budget("1.0"), float)
    assert parse_method_args(["official_quirks=true", "anchor_ratio=0.2", "object_block=8", "impl=torch"]) == {
        "official_quirks": True, "anchor_ratio": 0.2, "object_block": 8, "impl": "torch"}
    with pytest.raises(ValueError, match="method-args"):
        parse_method_args(["official_quirks"])


# --- lmms-eval itself ------------------------------------------------------------------------------------------


def test_entry_point_registers_prunelab_model():
    pytest.importorskip("lmms_eval", reason="the eval extra (lmms-eval) is not installed")
    from lmms_eval.models import get_model

    from prunelab.reproductions.lmms_model import PrunelabLMM

    assert get_model("prunelab") is PrunelabLMM


def test_entry_point_survives_importing_the_model_module_first():
    """Importing ``lmms_model`` before lmms-eval's model registry exists must not leave ``prunelab`` out of it (the
    registry imports the module for its entry point while the module is still importing)."""
    pytest.importorskip("lmms_eval", reason="the eval extra (lmms-eval) is not installed")
    import subprocess
    import sys

    code = ("import prunelab.reproductions.lmms_model as m\nfrom lmms_eval.models import get_model\n"
            "assert get_model('prunelab') is m.PrunelabLMM")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("family", FAMILIES)
def test_lmms_eval_keep_all_equals_dense(vlm_folders, task_dir, family):
    pytest.importorskip("lmms_eval", reason="the eval extra (lmms-eval) is not installed")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)

    def answers(extra: str):
        res = simple_evaluate(model="prunelab", model_args=f"pretrained={vlm_folders[family]},dtype=float32{extra}",
                              tasks=["prunelab_shapes"], batch_size=2, device="cpu", task_manager=manager,
                              log_samples=True)
        return [s["resps"] for s in res["samples"]["prunelab_shapes"]], res["results"]["prunelab_shapes"]

    dense, dense_res = answers(",method=dense")
    kept, kept_res = answers(",method=divprune,budget=1.0")
    pruned, pruned_res = answers(",method=divprune,budget=0.25")
    assert dense == kept and len(dense) == 6
    assert kept_res["shapes_accuracy,none"] == dense_res["shapes_accuracy,none"]
    assert 0.0 <= pruned_res["shapes_accuracy,none"] <= 1.0 and len(pruned) == 6


def test_full_preset_command_offline(vlm_folders, task_dir, tmp_path):
    pytest.importorskip("lmms_eval", reason="the eval extra (lmms-eval) is not installed")
    from prunelab.cli import main

    out = tmp_path / "full"
    main(["reproduce", "hiprune", "--preset", "full", "--model", str(vlm_folders["llava"]), "--tasks",
          "prunelab_shapes", "--include-path", str(task_dir), "--budgets", "4", "0.5", "--limit", "4",
          "--dtype", "float32", "--device", "cpu", "--batch-size", "2", "--method-args", "object_block=0",
          "--out", str(out)])
    data = json.loads((out / "full.json").read_text())
    got = {(r["method"], r["budget"]) for r in data["rows"]}
    assert got == {("dense", "all"), ("hiprune", 4), ("hiprune", 0.5), ("random_prune", 4), ("random_prune", 0.5)}
    assert all(r["metric"] == "shapes_accuracy" and 0.0 <= r["value"] <= 1.0 for r in data["rows"])
    assert data["provenance"]["model"] == str(vlm_folders["llava"])
    assert (out / "full.png").exists() and len(list((out / "lmms").glob("*.json"))) == 5
    assert torch.get_num_threads() >= 1
