"""Fashion-MNIST composites with templated questions, for a tiny VLM that must really read its image.

Why a grid: a scene is a 3 x 3 grid of 28 x 28 cells (84 x 84 grayscale), so every item sits in a known
region. Location and relation questions name cells, and every sample lists the cells (0..8, row-major) whose
content decides its answer, so a pruning experiment can remove exactly those image tokens.

A scene holds 1 to 5 items at distinct random cells; empty cells are 0. After the first item, each item
repeats a class already in the scene with probability ``REPEAT`` (else a uniform class), so counts above 1
are common. Item images come from the Fashion-MNIST split named by ``split`` (``"test"``: held-out images).
One question per scene; the kind is drawn per sample with weights ``mix`` (uniform by default).

Kinds, answers and chance levels (majority-answer rates measured on 20k samples of either split):

- ``presence``: yes/no, exactly balanced over a dataset: 50 %.
- ``location``: one of 10 names or "nothing" (11 choices, uniform chance 9 %); the cell is empty with
  probability ``NOTHING`` = 0.2, so the majority answer is "nothing" at 20 % (each name about 8 %).
- ``count``: number words "zero".."five" (one token each after a space, unlike " 0".." 5"); a present class
  with probability ``COUNT_PRESENT`` = 0.8. Majority "one" at about 49 %; "zero" and "two" about 20 % each,
  "three".."five" rarer (12 %, 4 %, 1 %).
- ``relation``: the item left of / right of / above / below a class occurring exactly once, or "nothing";
  the neighbour is empty with probability ``NOTHING``. Majority "nothing", about 19 %.

Memory: scenes are not stored as pixels. ``Scenes`` keeps, per scene, the index of the item image in each
cell (int32 [n, 9]) and its class (int8 [n, 9]), i.e. 45 bytes a scene plus the shared 28 x 28 uint8 split,
and renders on demand (``Scenes[i]``, ``Scenes.images``, ``render``); n = 100k costs about 5 MB and about
10 s to generate on one CPU core.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from prunelab.reproductions.testbeds.fashion import NAMES, PLURALS, load_fashion_mnist

GRID = 3
CELL = 28
SIZE = GRID * CELL
MAX_ITEMS = 5
REPEAT = 0.4  # probability that an item after the first repeats a class already in the scene
NOTHING = 0.2  # share of location / relation questions whose answer is "nothing"
COUNT_PRESENT = 0.8  # share of count questions about a class present in the scene
# Pixel mean / std of composites on the [0, 1] scale (20k scenes of either split; mostly empty cells).
MEAN = 0.101
STD = 0.251

KINDS = ("presence", "location", "count", "relation")
# Cell index = 3 * row + column; POSITIONS[cell] names it.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
# Phrase -> (row step, column step) to the neighbour cell.
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}
COUNTS = ("zero", "one", "two", "three", "four", "five")  # count answers: COUNTS[k] for k items
CHOICES = {"presence": ("yes", "no"), "location": (*NAMES, "nothing"), "count": COUNTS, "relation": (*NAMES, "nothing")}
# Fields: {name} singular class name, {names} plural, {position} a POSITIONS entry, {relation} a RELATIONS key.
# "heldout" phrasings share no sentence with "train" ones; evaluate on them to test phrasing transfer.
TEMPLATES = {
    "train": {
        "presence": ("Is there a {name}?", "Does the image contain a {name}?"),
        "location": ("What is in the {position} cell?", "What is shown in the {position} square?"),
        "count": ("How many {names} are there?", "Count the {names}."),
        "relation": ("What is {relation} the {name}?", "What lies {relation} the {name}?"),
    },
    "heldout": {
        "presence": ("Do you see a {name}?", "Is any {name} visible?"),
        "location": ("Which item is in the {position} cell?", "Name the item in the {position} square."),
        "count": ("What is the number of {names}?", "How many {names} can you see?"),
        "relation": ("Which item is {relation} the {name}?", "Name the item {relation} the {name}."),
    },
}
ALL_CELLS = tuple(range(GRID * GRID))


@dataclasses.dataclass(frozen=True)
class Scene:
    """One composite: ``image`` float32 [84, 84] in [0, 1]; ``cells`` the class per cell (-1 empty), row-major."""

    image: np.ndarray
    cells: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Sample:
    """A question about scene ``scene_index``; ``answer`` is in ``choices``; ``cells`` decide the answer."""

    scene_index: int
    question: str
    answer: str
    choices: tuple[str, ...]
    kind: str
    cells: tuple[int, ...]


def render(sources: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Pastes item images into grids: ``sources`` int [..., 9] (item index per cell, -1 empty), ``items``
    uint8 [N, 28, 28] -> float32 [..., 84, 84] in [0, 1]."""
    sources = np.asarray(sources)
    tiles = np.where((sources >= 0)[..., None, None], items[np.maximum(sources, 0)], 0)
    tiles = tiles.reshape(*sources.shape[:-1], GRID, GRID, CELL, CELL).swapaxes(-3, -2)
    return tiles.reshape(*sources.shape[:-1], SIZE, SIZE).astype(np.float32) / 255.0


class Scenes:
    """Scenes stored as item indices; ``scenes[i]`` renders a ``Scene``, ``images(idx)`` a batch."""

    def __init__(self, sources: np.ndarray, cells: np.ndarray, items: np.ndarray):
        self.sources, self.cells, self.items = sources, cells, items

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> Scene:
        return Scene(render(self.sources[i], self.items), tuple(int(c) for c in self.cells[i]))

    def images(self, index: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 [B, 84, 84] for scene indices ``index``."""
        return render(self.sources[np.asarray(index)], self.items)


class Dataset(NamedTuple):
    """What ``make_dataset`` returns: ``samples[i]`` asks about ``scenes[samples[i].scene_index]``."""

    samples: list[Sample]
    scenes: Scenes


def to_pixels(images: np.ndarray | torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """[B, 84, 84] (or [84, 84]) in [0, 1] -> float32 [B, 3, size, size]: bilinear resize when ``size`` differs,
    ``(x - MEAN) / STD``, the gray channel repeated three times."""
    x = torch.as_tensor(images, dtype=torch.float32)
    x = (x[None] if x.dim() == 2 else x)[:, None]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - MEAN) / STD).expand(-1, 3, -1, -1).contiguous()


@functools.lru_cache(maxsize=2)
def _load(split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = (t.numpy() for t in load_fashion_mnist(split))
    images.flags.writeable = labels.flags.writeable = False  # shared by every dataset of this split
    return images, labels


def _neighbour(cell: int, step: tuple[int, int]) -> int | None:
    row, col = cell // GRID + step[0], cell % GRID + step[1]
    return row * GRID + col if 0 <= row < GRID and 0 <= col < GRID else None


def _weights(kinds: Sequence[str], mix: Mapping[str, float] | None) -> np.ndarray:
    if isinstance(kinds, str) or not kinds or len(set(kinds)) != len(kinds) or set(kinds) - set(KINDS):
        raise ValueError(f"kinds must be distinct entries of {KINDS}, got kinds={kinds!r}")
    if mix is None:
        return np.full(len(kinds), 1.0 / len(kinds))
    if not isinstance(mix, Mapping) or set(mix) - set(kinds):
        raise ValueError(f"mix must map entries of kinds={tuple(kinds)} to weights, got mix={mix!r}")
    w = np.array([float(mix.get(k, 0.0)) for k in kinds])
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"mix weights must be finite, >= 0 and not all 0, got mix={mix!r}")
    return w / w.sum()


def _scene(rng: np.random.Generator, by_class: list[np.ndarray], avail: np.ndarray) -> tuple[list[int], list[int]]:
    """(sources, cells) of a random scene, 9 entries each, -1 for empty."""
    k = int(rng.integers(1, MAX_ITEMS + 1))
    classes = [int(rng.choice(avail))]
    for _ in range(k - 1):
        classes.append(int(rng.choice(classes)) if rng.random() < REPEAT else int(rng.choice(avail)))
    sources, cells = [-1] * 9, [-1] * 9
    for pos, c in zip(rng.permutation(9)[:k], classes):
        sources[pos], cells[pos] = int(rng.choice(by_class[c])), c
    return sources, cells


def _question(rng, kind: str, cells: list[int], flag: bool) -> tuple[dict, str, tuple[int, ...]] | None:
    """(template fields, answer, deciding cells) for ``kind`` on ``cells``; None if the scene cannot host it.

    ``flag``: presence: answer yes; location / relation: answer "nothing"; count: ask about a present class.
    """
    present = sorted({c for c in cells if c >= 0})
    absent = [c for c in range(len(NAMES)) if c not in present]
    if kind == "presence":
        c = int(rng.choice(present if flag else absent))
        return {"name": NAMES[c]}, "yes" if flag else "no", tuple(i for i, x in enumerate(cells) if x == c) or ALL_CELLS
    if kind == "location":
        cell = int(rng.choice([i for i, x in enumerate(cells) if (x < 0) == flag]))
        return {"position": POSITIONS[cell]}, NAMES[cells[cell]] if cells[cell] >= 0 else "nothing", (cell,)
    if kind == "count":
        c = int(rng.choice(present if flag else absent))
        return {"name": NAMES[c], "names": PLURALS[c]}, COUNTS[cells.count(c)], ALL_CELLS
    # relation: the anchor's class occurs once and its neighbour in that direction lies in the grid
    pairs = [
        (a, rel, nb)
        for a, c in enumerate(cells)
        if c >= 0 and cells.count(c) == 1
        for rel, step in RELATIONS.items()
        if (nb := _neighbour(a, step)) is not None and (cells[nb] < 0) == flag
    ]
    if not pairs:
        return None
    a, rel, nb = pairs[int(rng.integers(len(pairs)))]
    answer = NAMES[cells[nb]] if cells[nb] >= 0 else "nothing"
    return {"name": NAMES[cells[a]], "relation": rel}, answer, (a, nb)


def ask(rng: np.random.Generator, cells: Sequence[int], kind: str, scene_index: int = 0,
        templates: str = "train") -> Sample | None:
    """One more question of ``kind`` about a scene whose classes per cell are ``cells`` (-1 empty), drawn as
    :func:`make_dataset` draws its questions (presence answered yes with probability 1/2, the other kinds' flags at
    their rates); ``None`` when the scene cannot host it (a relation question needs a class that occurs once)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got kind={kind!r}")
    cells = [int(c) for c in cells]
    rate = 0.5 if kind == "presence" else COUNT_PRESENT if kind == "count" else NOTHING
    flag = bool(rng.random() < rate)
    if not 1 <= sum(c >= 0 for c in cells) <= MAX_ITEMS:
        raise ValueError(f"cells must hold 1..{MAX_ITEMS} items (as make_dataset's scenes do), got cells={cells}")
    if (q := _question(rng, kind, cells, flag)) is None:
        return None
    fields, answer, region = q
    phrasing = TEMPLATES[templates][kind][int(rng.integers(len(TEMPLATES[templates][kind])))]
    return Sample(scene_index, phrasing.format(**fields), answer, CHOICES[kind], kind, region)


def make_dataset(
    split: str,
    n: int,
    *,
    seed: int,
    kinds: Sequence[str] = KINDS,
    templates: str = "train",
    mix: Mapping[str, float] | None = None,
    data: tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor] | None = None,
) -> Dataset:
    """``n`` scenes with one question each, deterministic in ``seed`` (a numpy Generator, no global state).

    Args:
        split: ``"train"`` or ``"test"``: the Fashion-MNIST split the item images come from.
        n: Number of samples (= scenes), >= 1.
        seed: Seed of the generator.
        kinds: Question kinds to draw from, a subset of ``KINDS``.
        templates: ``"train"`` or ``"heldout"`` phrasings (``TEMPLATES``).
        mix: Optional ``{kind: weight}``; kinds left out get weight 0; uniform over ``kinds`` by default.
        data: Optional preloaded ``(images uint8 [N, 28, 28], labels [N])`` of that split (e.g. a synthetic
            stand-in); by default ``load_fashion_mnist(split)`` from the Debian data.

    Returns:
        ``Dataset(samples, scenes)``: ``samples[i].scene_index == i``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got split={split!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int, got n={n!r}")
    if templates not in TEMPLATES:
        raise ValueError(f"templates must be one of {sorted(TEMPLATES)}, got templates={templates!r}")
    weights = _weights(kinds, mix)
    items, labels = _load(split) if data is None else (np.asarray(data[0]), np.asarray(data[1]))
    if items.ndim != 3 or items.shape[1:] != (CELL, CELL) or len(items) != len(labels) or not len(items):
        raise ValueError(f"data must be non-empty images [N, 28, 28] and labels [N], got {items.shape}, {labels.shape}")
    items, labels = items.astype(np.uint8, copy=False), labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= len(NAMES):
        raise ValueError(f"data labels must lie in 0..{len(NAMES) - 1}")
    by_class = [np.flatnonzero(labels == c) for c in range(len(NAMES))]
    avail = np.array([c for c in range(len(NAMES)) if len(by_class[c])])

    rng = np.random.default_rng(seed)
    chosen = np.asarray(kinds)[rng.choice(len(kinds), size=n, p=weights)].tolist()
    n_presence = chosen.count("presence")
    yes = rng.permutation(np.arange(n_presence) < (n_presence + 1) // 2)  # exactly balanced
    sources, cells, samples, j = np.empty((n, 9), np.int32), np.empty((n, 9), np.int8), [], 0
    for i, kind in enumerate(chosen):
        if kind == "presence":
            flag, j = bool(yes[j]), j + 1
        else:
            flag = bool(rng.random() < (COUNT_PRESENT if kind == "count" else NOTHING))
        for _ in range(10_000):  # only relation questions may need another scene
            src, cl = _scene(rng, by_class, avail)
            if (q := _question(rng, kind, cl, flag)) is not None:
                break
        else:
            raise RuntimeError(f"could not draw a scene for a {kind} question from these data")
        fields, answer, region = q
        phrasing = TEMPLATES[templates][kind][int(rng.integers(len(TEMPLATES[templates][kind])))]
        sources[i], cells[i] = src, cl
        samples.append(Sample(i, phrasing.format(**fields), answer, CHOICES[kind], kind, region))
    return Dataset(samples, Scenes(sources, cells, items))
