"""The task test-beds of Window-Diffusion: instances with exact answers and the letters split, the SFT canvas and
loss, a short fine-tune that round-trips, the shipped weights (checksums, the answer format, the letters model's exact
answers), and the early stop at EOS."""

from __future__ import annotations

import random
import re
import string

import pytest
import torch

from prunelab.methods.window_diffusion import WindowDiffusion, llada_generate, window_generate
from prunelab.reproductions.testbeds import diffusion_lm as dlm
from prunelab.reproductions.testbeds import diffusion_tasks as dt
from prunelab.reproductions.testbeds import shipped


@pytest.mark.parametrize("task", dt.TASKS)
@pytest.mark.parametrize("G", [64, 512])
def test_instances_have_the_exact_answer_and_fit_the_canvas(task, G):
    items = dt.examples(task, G, 20)
    assert items == dt.examples(task, G, 20) and items != dt.examples(task, G, 20, seed=1)
    for e in items:
        assert e.prompt.endswith("\n") and 0 < len(e.answer) <= G and e.gen_length == G
        if task == "count":
            start, end, by = map(int, re.fullmatch(r"count from (\d+) to (\d+) by (\d+):\n", e.prompt).groups())
            assert e.answer == " ".join(str(x) for x in range(start, end + 1, by))
        elif task == "repeat":
            times, phrase = re.fullmatch(r"repeat (\d+) times: (.+)\n", e.prompt).groups()
            assert e.answer == " ".join([phrase] * int(times))
        else:
            first, last, by = re.fullmatch(r"letters from ([a-z]) to ([a-z]) by (\d):\n", e.prompt).groups()
            letters = string.ascii_lowercase
            assert e.answer == " ".join(letters[letters.index(first):letters.index(last) + 1:int(by)])
    with pytest.raises(ValueError, match="task"):
        dt.examples("sort", G, 1)
    with pytest.raises(ValueError, match="split"):
        dt.examples(task, G, 1, split="test")


def test_letters_keeps_its_held_out_instances_out_of_training():
    def key(e):
        first, last, by = re.fullmatch(r"letters from ([a-z]) to ([a-z]) by (\d):\n", e.prompt).groups()
        return string.ascii_lowercase.index(first), string.ascii_lowercase.index(last), int(by)

    held = {key(e) for e in dt.examples("letters", 64, 300)}
    train = {key(e) for e in dt.examples("letters", 64, 300, split="train")}
    assert held and train and not held & train and all(dt.letters_held_out(*k) for k in held)
    rng = random.Random(0)  # what training draws
    drawn = [dt._instance("letters", rng, 64, [], "train") for _ in range(2000)]
    assert not any(dt.letters_held_out(*key(e)) for e in drawn if e is not None)
    assert max(len(e.answer) for e in drawn if e is not None) == 51  # "a b ... z" fits the smallest canvas


def test_each_task_has_its_test_bed():
    assert [dt.testbed_of(t) for t in dt.TASKS] == ["tasks", "tasks", "letters"]
    assert dt.TESTBEDS["letters"].command.endswith("--testbed letters")
    with pytest.raises(ValueError, match="task"):
        dt.testbed_of("sort")
    with pytest.raises(ValueError, match="testbed"):
        dt.load(testbed="sort")


def test_the_canvas_pads_prompts_left_and_answers_with_eos():
    charset = dlm.Charset.of("".join(dlm.corpus()))
    batch = [dt.Example("count", "ab\n", "12", 5), dt.Example("count", "abcd\n", "345", 5)]
    ids, real, response = dt._canvas(batch, charset)
    assert ids.shape == (2, 10) and real[0].tolist() == [0, 0] + [1] * 8 and real[1].tolist() == [1] * 10
    assert charset.decode(ids[0, 2:5]) == "ab\n" and charset.decode(ids[0, 5:7]) == "12"
    assert ids[0, 7:].tolist() == [charset.eos_id] * 3 and response[:, 5:].all() and not response[:, :5].any()


def test_sft_loss_masks_the_response_only():
    charset = dlm.Charset.of("abc\n12")
    small = dlm.DLMConfig(hidden_size=32, layers=1, heads=2, intermediate_size=64, seq_len=16)
    model = dlm.build(small, charset)
    ids, real, response = dt._canvas([dt.Example("count", "ab\n", "12", 4)], charset)
    loss = dt.sft_loss(model, ids, real, response, torch.Generator().manual_seed(0), 1e-3)
    g = torch.Generator().manual_seed(0)  # the same draws, by hand
    t = 1e-3 + (1 - 1e-3) * torch.rand(1, 1, generator=g)
    masked = (torch.rand(ids.shape, generator=g) < t) & response
    ce = torch.nn.functional.cross_entropy(model(torch.where(masked, model.mask_id, ids), real)[0], ids[0],
                                           reduction="none")
    torch.testing.assert_close(loss, (ce * masked[0] / t[0]).sum() / 4)


@pytest.mark.parametrize("tasks", [("count", "repeat"), ("letters",)])
def test_a_short_fine_tune_round_trips(tmp_path, tasks):
    small = dlm.DLMConfig(hidden_size=32, layers=1, heads=2, intermediate_size=64, seq_len=32, batch_size=2, steps=2)
    base, info = dlm.train(small, progress=False)
    dlm.save(base, info, tmp_path / "base.safetensors")
    model, charset, record = dt.finetune(dt.TaskConfig(steps=2, tasks=tasks, text_batch=2, task_tokens=64),
                                         base=tmp_path / "base.safetensors", progress=False)
    assert all(torch.isfinite(torch.tensor(record["loss_first_last"])))
    dt.save(model, record, tmp_path / "tasks.safetensors")
    loaded, _, meta = dt.load(tmp_path / "tasks.safetensors")
    x = charset.encode("count from 1 to 3 by 1:\n")[None]
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta["tasks_recipe"]["steps"] == 2 and meta["tasks_recipe"]["tasks"] == list(tasks)


@pytest.mark.parametrize("name", list(dt.TESTBEDS))
def test_shipped_weights_checksum(name):
    testbed = dt.TESTBEDS[name]
    assert shipped.sha256(testbed.weights) == testbed.sha256
    _, _, info = dt.load(testbed=name)
    assert info["tasks_recipe"]["steps"] == testbed.recipe.steps and info["tasks_recipe"]["seed"] == 0
    if testbed.base is not None:
        assert info["base_sha256"] == dt.TESTBEDS[testbed.base].sha256


def test_the_letters_model_solves_most_instances_it_was_trained_on():
    """Recorded at training (16 instances per canvas), and live on four instances at G = 64 (seconds)."""
    model, charset, info = dt.load(testbed="letters")
    assert min(info["exact_match_train"].values()) >= 0.5 and min(info["exact_match"].values()) > 0.1
    items = dt.examples("letters", 64, 4, split="train")
    got = dt.answers(llada_generate(model, dt.prompts_of(items, charset), 64), charset)
    assert sum(g == e.answer for g, e in zip(got, items)) >= 3


@pytest.fixture(scope="module")
def shipped_model():
    return dt.load()


def test_the_shipped_model_answers_in_the_format(shipped_model):
    """It has not learned the tasks (no exact answer: see the test-beds' README), but their format: short answers
    that end with EOS inside the canvas, ``count`` answers of numbers and spaces."""
    model, charset, info = shipped_model
    items = dt.examples("count", 64, 4)
    gen = llada_generate(model, dt.prompts_of(items, charset), 64)
    assert all(charset.eos_id in row for row in gen.answer.tolist())
    assert all(re.fullmatch(r"[0-9 ]+", a) for a in dt.answers(gen, charset))
    assert set(info["exact_match"].values()) == {0.0}  # recorded as measured
    assert info["held_out"]["0.15"]["accuracy"] > info["held_out"]["0.15"]["majority_baseline"] + 0.2


def test_early_stop_keeps_the_answers_and_saves_steps(shipped_model):
    model, charset, _ = shipped_model
    prompts = dt.prompts_of(dt.examples("count", 64, 3), charset)
    method = WindowDiffusion(window_tokens=32, active_tokens=8, refresh_cycle=16)
    for run in (lambda **k: llada_generate(model, prompts, 64, **k),
                lambda **k: window_generate(model, prompts, 64, method, **k)):
        full, stopped = run(), run(early_stop=True)
        assert dt.answers(stopped, charset) == dt.answers(full, charset)
        assert model.mask_id not in stopped.answer.tolist() and len(stopped.log) <= len(full.log)
        assert (stopped.decoded_at >= 0).all()
    # an answer that ends before the canvas and is decoded left to right: the stop skips the EOS tail
    prompt = dt.prompts_of(dt.examples("repeat", 64, 8)[6:7], charset)
    small = WindowDiffusion(window_tokens=16, active_tokens=4, refresh_cycle=8)
    full, stopped = (window_generate(model, prompt, 64, small, early_stop=e) for e in (False, True))
    assert dt.answers(stopped, charset) == dt.answers(full, charset) and len(stopped.log) < len(full.log)
