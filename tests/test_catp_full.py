"""Multimodal in-context learning on the lmms-eval path and CATP's full preset, offline: the demonstrations' draw
and answers, prompts with demonstrations through ``PrunedVLM`` (keep-all CATP answers like dense; a padded batch of
prompts with different numbers of demonstrations equals each prompt alone), the lmms-eval model's ``shots`` on the
synthetic task, and ``prunelab reproduce catp --preset full`` end to end on a tiny folder."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from prunelab.reproductions.vlm_eval import PrunedVLM, draw_shots, load_vlm, make_vlm_method
from prunelab.reproductions.vlm_offline import shapes_doc_to_visual, shapes_docs, write_shapes_task

FAMILIES = ("llava", "qwen2_5_vl")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_shapes_task(tmp_path_factory.mktemp("tasks_icl"), n=4, train=6)


def test_draw_shots():
    a = draw_shots(50, 4, seed=0, key="task/test/3", exclude=3)
    assert a == draw_shots(50, 4, seed=0, key="task/test/3", exclude=3)  # reproducible
    assert len(set(a)) == 4 and 3 not in a and all(0 <= i < 50 for i in a)
    assert a != draw_shots(50, 4, seed=1, key="task/test/3", exclude=3)
    assert sorted(draw_shots(5, 4, seed=0, key="k", exclude=2)) == [0, 1, 3, 4]  # all the others
    assert draw_shots(5, 0, seed=0, key="k") == []
    with pytest.raises(ValueError, match="shots"):
        draw_shots(5, 5, seed=0, key="k", exclude=0)
    with pytest.raises(ValueError, match="shots"):
        draw_shots(5, -1, seed=0, key="k")


def test_shot_answer():
    from prunelab.reproductions.lmms_model import shot_answer

    template = SimpleNamespace(doc_to_target=lambda d: "answer", config=SimpleNamespace(doc_to_target="answer"))
    vqa = {"answers": [{"answer": "2"}, {"answer": "two"}, {"answer": "two"}], "question": "how many?"}
    assert shot_answer(template, vqa, "t") == "two"  # a target naming no field: the most frequent human answer
    assert shot_answer(template, {"answers": ["b", "a", "a", "b"]}, "t") == "b"  # ties to the first
    field = SimpleNamespace(doc_to_target=lambda d: d["answer"], config=SimpleNamespace(doc_to_target="answer"))
    assert shot_answer(field, {"answer": "yes"}, "t") == "yes"
    assert shot_answer(field, {"answer": "yes", "mc": "no"}, "t", "mc") == "no"
    with pytest.raises(ValueError, match="shot_answer"):
        shot_answer(template, {"question": "q"}, "t")
    with pytest.raises(ValueError, match="shot_answer"):
        shot_answer(field, {"answer": "yes"}, "t", "absent")
    with pytest.raises(ValueError, match="shot_answer"):
        shot_answer(template, {"answers": []}, "t")


def _shots(n: int, seed: int):
    return [(shapes_doc_to_visual(d), d["question"], d["answer"]) for d in shapes_docs(n, seed=seed)]


def test_prompt_with_demonstrations(vlm_folders):
    model, processor = load_vlm(str(vlm_folders["llava"]), dtype="float32")
    vlm = PrunedVLM(model, processor)
    shots = _shots(2, 5)
    prompt = vlm.prompt("Is there a red circle in the image?", 1, shots)
    assert prompt.count("<image>") == 3
    assert shots[0][1] != shots[1][1]
    first, second = (prompt.index(s[1]) for s in shots)
    assert first < second < prompt.index("Is there a red circle")
    assert prompt.index("assistant: " + shots[0][2]) < second  # each demonstration's answer follows its question
    assert vlm.prompt("q", 1) == vlm.prompt("q", 1, ())


@pytest.mark.parametrize("family", FAMILIES)
def test_catp_with_demonstrations_keep_all_and_batch(vlm_folders, family):
    model, processor = load_vlm(str(vlm_folders[family]), dtype="float32")
    docs = shapes_docs(2, seed=9)
    questions = [d["question"] for d in docs]
    images = [shapes_doc_to_visual(d) for d in docs]
    shots = [_shots(2, 1), _shots(1, 2)]  # different numbers of demonstrations: a padded batch
    dense = PrunedVLM(model, processor).generate(questions, images, shots=shots, max_new_tokens=3)
    kept = PrunedVLM(model, processor, make_vlm_method("catp", model, ratio=0.0, layer=1, query_layer=1))
    assert kept.generate(questions, images, shots=shots, max_new_tokens=3) == dense
    kept.remove()
    pruned = PrunedVLM(model, processor, make_vlm_method("catp", model, ratio=0.778, layer=1, query_layer=1))
    batch = pruned.generate(questions, images, shots=shots, max_new_tokens=3)
    alone = [pruned.generate([q], [im], shots=[s], max_new_tokens=3)[0] for q, im, s in zip(questions, images, shots)]
    assert batch == alone
    history = pruned.handle.state.history
    assert [len(ids) for _, ids in history][-1] == 2  # the last prompt alone: two images, a context and the query
    pruned.remove()
    with pytest.raises(ValueError, match="shots"):
        PrunedVLM(model, processor).generate(questions, images, shots=shots[:1])


def test_lmms_model_draws_demonstrations_from_the_training_split(vlm_folders, task_dir):
    pytest.importorskip("lmms_eval", reason="the eval extra (lmms-eval) is not installed")
    from lmms_eval.tasks import TaskManager, get_task_dict

    from prunelab.reproductions.lmms_model import PrunelabLMM

    task = get_task_dict(["prunelab_shapes"], TaskManager(include_path=str(task_dir), include_defaults=False))
    task = task["prunelab_shapes"]
    lm = PrunelabLMM(pretrained=str(vlm_folders["llava"]), dtype="float32", device="cpu", shots=2, shot_seed=4)
    lm.task_dict = {"prunelab_shapes": task.dataset}
    train = task.dataset["train"]
    got = lm._shots(task.doc_to_visual, 1, "prunelab_shapes", "test")
    picks = draw_shots(len(train), 2, seed=4, key="prunelab_shapes/test/1")
    assert [g[1] for g in got] == [task.doc_to_text(train[i]) for i in picks]
    assert [g[2] for g in got] == [train[i]["answer"] for i in picks]
    assert all(len(g[0]) == 1 and g[0][0].mode == "RGB" for g in got)
    lm.shot_split = "test"  # the evaluated split: never the question itself
    for doc_id in range(4):
        got = lm._shots(task.doc_to_visual, doc_id, "prunelab_shapes", "test")
        want = {task.doc_to_text(task.dataset["test"][i]) for i in range(4) if i != doc_id}
        assert len(got) == 2 and {g[1] for g in got} <= want
    lm.shot_split = "validation"
    with pytest.raises(ValueError, match="shot_split"):
        lm._shots(task.doc_to_visual, 0, "prunelab_shapes", "test")
    with pytest.raises(ValueError, match="shots"):
        lm._shots(lambda doc: [], 0, "prunelab_shapes", "test")  # no task object behind doc_to_visual
    with pytest.raises(ValueError, match="shots"):
        PrunelabLMM(pretrained=str(vlm_folders["llava"]), dtype="float32", device="cpu", shots=-1)


def test_lmms_eval_with_shots_keep_all_equals_dense(vlm_folders, task_dir):
    pytest.importorskip("lmms_eval", reason="the eval extra (lmms-eval) is not installed")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)

    def answers(extra: str):
        margs = f"pretrained={vlm_folders['llava']},dtype=float32,shots=2{extra}"
        res = simple_evaluate(model="prunelab", model_args=margs, tasks=["prunelab_shapes"], batch_size=2,
                              device="cpu", task_manager=manager, log_samples=True)
        return [s["resps"] for s in res["samples"]["prunelab_shapes"]]

    dense = answers(",method=dense")
    assert dense == answers(",method=catp,ratio=0.0,layer=1,query_layer=1") and len(dense) == 4


def test_catp_full_preset_offline(vlm_folders, task_dir, tmp_path):
    pytest.importorskip("lmms_eval", reason="the eval extra (lmms-eval) is not installed")
    from prunelab.cli import main

    out = tmp_path / "full"
    common = ["reproduce", "catp", "--preset", "full", "--model", str(vlm_folders["llava"]), "--tasks",
              "prunelab_shapes", "--include-path", str(task_dir), "--limit", "2", "--dtype", "float32", "--device",
              "cpu", "--shots", "2", "--method-args", "layer=1", "query_layer=1", "--out", str(out)]
    main([*common, "--budgets", "0.222", "--methods", "dense", "catp", "random_prune"])
    data = json.loads((out / "full.json").read_text())
    assert {(r["method"], r["budget"]) for r in data["rows"]} == {("dense", "all"), ("catp", 0.222),
                                                                  ("random_prune", 0.222)}
    assert data["provenance"]["shots"].startswith("2 demonstrations per question, seed 0")
    assert (out / "lmms" / "catp_0.222.json").is_file()
    with pytest.raises(ValueError, match="budgets"):  # CATP removes a share: token counts are refused
        main([*common, "--budgets", "8", "--methods", "catp"])
    assert torch.get_num_threads() >= 1
