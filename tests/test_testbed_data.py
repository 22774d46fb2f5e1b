"""Shared test-bed data: the moved Fashion-MNIST loader and the grid composites with templated questions.

Answers and deciding cells are re-derived here from each scene's cell classes and the question text alone.
"""

from __future__ import annotations

import collections
import re
import string

import numpy as np
import pytest
import torch
from testbed_helpers import NEEDS_FASHION_MNIST

from prunelab.reproductions.testbeds import composites as C
from prunelab.reproductions.testbeds import fashion

FIELDS = {
    "name": r"(?P<name>\w+)",
    "names": r"(?P<names>\w+)",
    "position": r"(?P<position>[a-z ]+?)",
    "relation": r"(?P<relation>left of|right of|above|below)",
}
STEPS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}


def pattern(template: str) -> re.Pattern:
    parts = [
        re.escape(text) + (FIELDS[field] if field else "") for text, field, _, _ in string.Formatter().parse(template)
    ]
    return re.compile("".join(parts) + "$")


def parse(question: str, kind: str) -> tuple[str, dict]:
    """(template set, fields) of the one template that produced ``question``."""
    hits = [
        (which, m.groupdict())
        for which, kinds in C.TEMPLATES.items()
        for t in kinds[kind]
        if (m := pattern(t).match(question))
    ]
    assert len(hits) == 1, (question, hits)
    return hits[0]


def position_cell(position: str) -> int:
    words = position.split()
    row = 0 if "top" in words else 2 if "bottom" in words else 1
    col = 0 if "left" in words else 2 if "right" in words else 1
    return 3 * row + col


def class_of(name: str) -> int:
    return fashion.NAMES.index(name)


def check(sample: C.Sample, cells: tuple[int, ...]) -> None:
    """Re-derives ``sample``'s answer and deciding cells from the scene's cell classes."""
    _, f = parse(sample.question, sample.kind)
    every = tuple(range(9))
    assert sample.choices == C.CHOICES[sample.kind] and sample.answer in sample.choices
    if sample.kind == "presence":
        c = class_of(f["name"])
        where = tuple(i for i, x in enumerate(cells) if x == c)
        assert sample.answer == ("yes" if where else "no")
        assert sample.cells == (where or every)
    elif sample.kind == "location":
        p = position_cell(f["position"])
        assert sample.answer == (fashion.NAMES[cells[p]] if cells[p] >= 0 else "nothing")
        assert sample.cells == (p,)
    elif sample.kind == "count":
        c = class_of(f["name"]) if "name" in f else fashion.PLURALS.index(f["names"])
        words = ("zero", "one", "two", "three", "four", "five")
        assert sample.answer == words[sum(x == c for x in cells)] and sample.cells == every
    else:
        c = class_of(f["name"])
        assert sum(x == c for x in cells) == 1, "relation anchors must occur exactly once"
        a = cells.index(c)
        dr, dc = STEPS[f["relation"]]
        row, col = a // 3 + dr, a % 3 + dc
        assert 0 <= row < 3 and 0 <= col < 3, "relation neighbours must lie in the grid"
        nb = 3 * row + col
        assert sample.answer == (fashion.NAMES[cells[nb]] if cells[nb] >= 0 else "nothing")
        assert sample.cells == (a, nb)


@pytest.fixture(scope="module")
def real():
    return C.make_dataset("train", 1600, seed=0)


def synthetic(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8), np.arange(n) % 10


def test_class_words():
    assert len(fashion.NAMES) == len(fashion.PLURALS) == len(fashion.CLASSES) == 10
    assert all(n.isalpha() for n in fashion.NAMES + fashion.PLURALS) and len(set(fashion.NAMES + fashion.PLURALS)) == 19


@NEEDS_FASHION_MNIST
def test_answers_correct_by_construction(real):
    samples, scenes = real
    kinds = collections.Counter(s.kind for s in samples)
    assert set(kinds) == set(C.KINDS) and min(kinds.values()) > 300
    for i, s in enumerate(samples):
        assert s.scene_index == i
        check(s, scenes[i].cells)
        assert parse(s.question, s.kind)[0] == "train"


@NEEDS_FASHION_MNIST
def test_scenes_match_cells(real):
    _, scenes = real
    _, labels = fashion.load_fashion_mnist("train")
    filled = scenes.sources >= 0
    assert np.array_equal(filled, scenes.cells >= 0)
    assert np.array_equal(labels.numpy()[scenes.sources[filled]], scenes.cells[filled])
    assert set(filled.sum(1)) == set(range(1, 6))
    scene = scenes[7]
    assert scene.image.shape == (84, 84) and scene.image.dtype == np.float32 and len(scene.cells) == 9
    tiles = scene.image.reshape(3, 28, 3, 28).swapaxes(1, 2).reshape(9, 28, 28)
    for tile, c, src in zip(tiles, scene.cells, scenes.sources[7]):
        assert (tile.max() == 0) if c < 0 else np.array_equal(tile, scenes.items[src] / np.float32(255))
    np.testing.assert_array_equal(scenes.images([7, 7])[1], scene.image)


@NEEDS_FASHION_MNIST
def test_heldout_templates_and_test_split():
    samples, scenes = C.make_dataset("test", 400, seed=1, templates="heldout")
    _, labels = fashion.load_fashion_mnist("test")
    for i, s in enumerate(samples):
        assert parse(s.question, s.kind)[0] == "heldout"
        check(s, scenes[i].cells)
    filled = scenes.sources >= 0
    assert len(scenes.items) == 10000 and np.array_equal(labels.numpy()[scenes.sources[filled]], scenes.cells[filled])


def test_templates_disjoint():
    for kind in C.KINDS:
        train, held = C.TEMPLATES["train"][kind], C.TEMPLATES["heldout"][kind]
        assert len(train) >= 2 and len(held) >= 2 and not set(train) & set(held)


def test_determinism():
    d = synthetic()
    a, b, other = (C.make_dataset("train", 300, seed=s, data=d) for s in (5, 5, 6))
    assert a.samples == b.samples and np.array_equal(a.scenes.images(range(300)), b.scenes.images(range(300)))
    assert a.samples != other.samples and not np.array_equal(a.scenes.sources, other.scenes.sources)


def test_balance_and_nothing_share():
    d = synthetic()
    presence = C.make_dataset("train", 1000, seed=2, mix={"presence": 1}, data=d).samples
    assert abs(sum(s.answer == "yes" for s in presence) / 1000 - 0.5) <= 0.01
    for kind in ("location", "relation"):
        samples, scenes = C.make_dataset("train", 1000, seed=3, kinds=(kind,), data=d)
        share = sum(s.answer == "nothing" for s in samples) / len(samples)
        assert abs(share - C.NOTHING) < 0.05, (kind, share)
        for s in samples:
            check(s, tuple(int(c) for c in scenes.cells[s.scene_index]))


@NEEDS_FASHION_MNIST
def test_majority_rates_and_pixel_stats(real):
    """Chance levels stated in the module docstring: majority answer per kind."""
    samples, scenes = real
    rate = {}
    for kind in C.KINDS:
        answers = collections.Counter(s.answer for s in samples if s.kind == kind)
        rate[kind] = max(answers.values()) / sum(answers.values())
    assert abs(rate["presence"] - 0.5) < 0.01
    assert rate["location"] < 0.3 and rate["relation"] < 0.3 and 0.4 < rate["count"] < 0.6, rate
    x = scenes.images(range(len(scenes)))
    assert abs(x.mean() - C.MEAN) < 0.01 and abs(x.std() - C.STD) < 0.01


def test_to_pixels():
    x = C.to_pixels(np.ones((2, 84, 84), np.float32))
    assert x.shape == (2, 3, 84, 84) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.full_like(x, (1 - C.MEAN) / C.STD))
    assert C.to_pixels(torch.zeros(84, 84), size=224).shape == (1, 3, 224, 224)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"split": "val"}, "split"),
        ({"n": 0}, "n"),
        ({"n": 2.5}, "n"),
        ({"kinds": ("presence", "colour")}, "kinds"),
        ({"kinds": "presence"}, "kinds"),
        ({"kinds": ()}, "kinds"),
        ({"templates": "test"}, "templates"),
        ({"mix": {"colour": 1.0}}, "mix"),
        ({"mix": {"count": -1.0}}, "mix"),
        ({"kinds": ("count",), "mix": {"count": 0.0}}, "mix"),
    ],
)
def test_bad_inputs(kwargs, name):
    args = {"split": "train", "n": 10, "seed": 0, "data": synthetic(), **kwargs}
    with pytest.raises(ValueError, match=rf"\b{name}="):
        C.make_dataset(**args)


def test_ask_draws_more_correct_questions_about_a_scene():
    data = C.make_dataset("train", 40, seed=5, data=synthetic())
    rng = np.random.default_rng(0)
    got = collections.Counter()
    for i in range(len(data.scenes)):
        cells = data.scenes.cells[i]
        for kind in C.KINDS:
            for templates in ("train", "heldout"):
                s = C.ask(rng, cells, kind, i, templates)
                if s is None:
                    assert kind == "relation"
                    continue
                assert s.scene_index == i and s.kind == kind and s.choices == C.CHOICES[kind]
                check(s, tuple(int(c) for c in cells))
                assert parse(s.question, kind)[0] == templates
                got[kind] += 1
    assert min(got[k] for k in ("presence", "location", "count")) == 80 and got["relation"] > 20
    with pytest.raises(ValueError, match="kind="):
        C.ask(rng, data.scenes.cells[0], "colour")
    with pytest.raises(ValueError, match="cells="):
        C.ask(rng, [-1] * 9, "presence")
