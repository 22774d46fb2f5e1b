"""The multimodal in-context-learning test-bed: the VLM test-bed's LLaVA retrained so its answer comes from its
demonstrations.

Why: CATP (``methods/catp``) prunes the image tokens of multi-image prompts (demonstrations, then a query image), and
its quality claim is about in-context learning: the context images it keeps must still tell the model what the
query's answer is. This test-bed is a model whose answer can only come from the demonstrations, so removing the
wrong context tokens costs accuracy.

The task (n-shot label mapping). A prompt holds ``n`` demonstrations and the query::

    <image>*144 Label: w1 . <image>*144 Label: w2 . ... <image>*144 Label:

Each image is an 84 px composite with one Fashion-MNIST garment in a random cell of the 3 x 3 grid (the other cells
empty), from the training split for training and from the test split for evaluation. Per prompt a fresh random
injective map sends the 10 garment classes to made-up label words (:data:`WORDS`, 16 of them); a demonstration's
label is its garment's word. The query's class is one of the demonstrations' (``n >= 1``), so its label is knowable
from them and only from them: without demonstrations (0-shot) the accuracy is chance, 1/16. Classes may repeat
among the demonstrations. The answer is read as the argmax of the last position's logits over :data:`WORDS`.

The model is the VLM test-bed's architecture (``vlm.py``: CLIP tower, LLaVA projector, 4-layer Llama of width 256) with
the vocabulary extended by ``label`` and the label words, and RoPE positions up to :data:`MAX_POSITIONS` (an 8-shot
prompt is 1,330 tokens). The recipe (:class:`Recipe`, :func:`train`, ``python -m prunelab.reproductions.testbeds.icl``)
starts from the VLM test-bed's base weights, keeps the tower frozen and caches its features once, and trains the
projector and the language model on prompts assembled from the cache, after a short warm-up on the same prompts with
class names in place of the images (where the induction circuit forms cheaply); the trained model then runs end to
end from pixels. Held-out accuracy, measured and discussed in ``reproductions/testbeds/README.md``: 0.06 / 0.93 /
0.85 / 0.70 at 0 / 2 / 4 / 8 shots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from prunelab.reproductions.testbeds import composites as C
from prunelab.reproductions.testbeds import shipped, vlm
from prunelab.reproductions.testbeds.fashion import NAMES, load_fashion_mnist
from prunelab.reproductions.testbeds.shipped import sha256
from prunelab.reproductions.testbeds.training import warmup_cosine
from prunelab.reproductions.testbeds.vlm import cached_forward, tower_features

WORDS = ("dax", "wug", "blick", "fep", "zup", "lorp", "tiv", "kiki", "bouba", "gazzer", "mib", "toma", "wim", "yop",
         "zorb", "nulf")
"""The label words: one token each, none an English word of the VLM vocabulary, more than the 10 classes so a
prompt's map is a fresh choice of words as well as of their order."""
CLASSES = len(NAMES)
MAX_SHOTS = 8
MAX_POSITIONS = 2048
DEMO = vlm.TOKENS + 4  # a demonstration's tokens: 144 image tokens, "label", ":", its word, "."
WEIGHTS = Path(__file__).with_name("weights") / "icl.safetensors"
SHA256 = "b40dac918f82361092cf2561bfb05e0b9a441aedc93ff77ce1750695b251f3f9"  # of WEIGHTS; main() prints it
COMMAND = "python -m prunelab.reproductions.testbeds.icl"

__all__ = ["CLASSES", "COMMAND", "MAX_SHOTS", "Prompt", "Recipe", "SHA256", "WEIGHTS", "WORDS", "accuracy",
           "agreement", "batch", "build", "cached_forward", "chance", "feature_pool", "from_vlm", "held_out", "load",
           "main", "model_inputs", "prompt_ids", "prompts", "save", "sha256", "tokenizer", "tower_features",
           "train", "vocabulary", "with_queries", "word_ids"]


# -- vocabulary and prompts --------------------------------------------------------------------------------------
def vocabulary() -> tuple[str, ...]:
    """The VLM test-bed's vocabulary, then ``label`` and :data:`WORDS`: the old ids keep their meaning, so training
    starts from the VLM's embeddings."""
    return (*vlm.vocabulary(), "label", *WORDS)


def tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over :func:`vocabulary`."""
    return vlm.word_tokenizer(vocabulary())


@lru_cache(maxsize=1)
def word_ids() -> torch.Tensor:
    """[16] the token id of each of :data:`WORDS`."""
    return torch.tensor([vocabulary().index(w) for w in WORDS])


@lru_cache(maxsize=1)
def _text_ids() -> tuple[int, int, int]:
    words = vocabulary()
    return words.index("label"), words.index(":"), words.index(".")


def prompt_ids(labels: Sequence[int], images: Sequence[Sequence[int]] | None = None) -> list[int]:
    """The token ids of a prompt whose demonstrations carry the label token ids ``labels``: per demonstration 144
    ``<image>`` tokens, ``label``, ``:``, its word, ``.``; then the query's 144 image tokens, ``label``, ``:``.
    ``images``: other tokens in place of each image (the text warm-up of :func:`train`)."""
    label, colon, dot = _text_ids()
    if images is None:
        images = [[vlm.IMAGE_TOKEN] * vlm.TOKENS] * (len(labels) + 1)
    ids = []
    for image, word in zip(images, labels):
        ids += [*image, label, colon, int(word), dot]
    return ids + [*images[-1], label, colon]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """An n-shot prompt, demonstrations first and the query last: ``items`` index the Fashion-MNIST ``split``, the
    garment sits in grid cell ``cells`` (0..8, row-major) and is of class ``classes``; ``labels`` are the
    demonstrations' label words, ``answer`` the query's (an entry of :data:`WORDS`)."""

    split: str
    items: tuple[int, ...]
    cells: tuple[int, ...]
    classes: tuple[int, ...]
    labels: tuple[str, ...]
    answer: str

    @property
    def shots(self) -> int:
        return len(self.labels)


@lru_cache(maxsize=2)
def _split(split: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """(images uint8 [N, 28, 28], the indices of each class) of a Fashion-MNIST split."""
    images, labels = (t.numpy() for t in load_fashion_mnist(split))
    return images, [np.flatnonzero(labels == c) for c in range(CLASSES)]


def _classes(rng: np.random.Generator, shots: int, *, groups: bool = False) -> list[int]:
    """The classes of ``shots`` demonstrations and the query (last). Evaluation: demonstrations uniform over the 10
    classes, the query uniform over the distinct classes among them (over all 10 at 0 shots). ``groups`` (training):
    the demonstrations come from a random subset of 1..shots classes, so more labels repeat an earlier class and
    are predictable, hence supervised."""
    pool = np.arange(CLASSES)
    if groups and shots:
        pool = rng.choice(CLASSES, size=int(rng.integers(1, min(shots, CLASSES) + 1)), replace=False)
    demos = [int(c) for c in rng.choice(pool, size=shots)]
    query = int(rng.choice(sorted(set(demos)) if demos else CLASSES))
    return [*demos, query]


def prompts(shots: int, n: int, *, split: str = "test", seed: int = 0) -> list[Prompt]:
    """``n`` seeded prompts of ``shots`` demonstrations each (the evaluation distribution of :func:`_classes`), their
    images from Fashion-MNIST's ``split`` (``"test"``: held out from training)."""
    if not 0 <= shots <= MAX_SHOTS:
        raise ValueError(f"shots must lie in 0..{MAX_SHOTS} (the positions the model was trained on), got {shots}")
    _, by_class = _split(split)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        classes = _classes(rng, shots)
        words = rng.permutation(len(WORDS))[:CLASSES]  # class -> word index, injective
        out.append(Prompt(split, tuple(int(rng.choice(by_class[c])) for c in classes),
                          tuple(int(c) for c in rng.integers(0, C.GRID * C.GRID, size=len(classes))),
                          tuple(classes), tuple(WORDS[words[c]] for c in classes[:-1]), WORDS[words[classes[-1]]]))
    return out


def with_queries(demos: Prompt, n: int, *, seed: int = 0) -> list[Prompt]:
    """``n`` prompts sharing the demonstrations of ``demos`` (its query is replaced): each query a seeded image of
    one of the demonstrations' classes, from the same split, its answer that class's label word."""
    if not demos.labels:
        raise ValueError("demos: a prompt with at least one demonstration")
    _, by_class = _split(demos.split)
    word = dict(zip(demos.classes[:-1], demos.labels))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        c = int(rng.choice(sorted(word)))
        out.append(dataclasses.replace(demos, items=(*demos.items[:-1], int(rng.choice(by_class[c]))),
                                       cells=(*demos.cells[:-1], int(rng.integers(0, C.GRID * C.GRID))),
                                       classes=(*demos.classes[:-1], c), answer=word[c]))
    return out


def chance(data: Sequence[Prompt]) -> tuple[float, float]:
    """(uniform over the 16 words, a label of the context drawn uniformly among its distinct labels) on the prompts
    ``data``: the two baselines of a model that reads no image; the second is what copying the context without
    matching the query's garment gets."""
    copy = [1 / len(set(p.labels)) if p.labels else 1 / len(WORDS) for p in data]
    return 1 / len(WORDS), float(np.mean(copy))


def _render(split: str, items: Sequence[int], cells: Sequence[int]) -> torch.Tensor:
    """[N, 3, 84, 84] pixels of single-garment composites (garment ``items[i]`` in cell ``cells[i]``)."""
    sources = np.full((len(items), C.GRID * C.GRID), -1, np.int64)
    sources[np.arange(len(items)), np.asarray(cells)] = items
    return C.to_pixels(C.render(sources, _split(split)[0]))


def batch(data: Sequence[Prompt]) -> dict:
    """Model inputs for the prompts ``data`` (any shot counts mixed; left padding): ``input_ids``,
    ``attention_mask``, ``pixel_values`` (one row per image, prompt by prompt in prompt order, as LLaVA fills the
    image tokens), and ``answer`` [B], the index of each prompt's answer in :data:`WORDS`."""
    vocab = {w: i for i, w in enumerate(vocabulary())}
    ids = [prompt_ids([vocab[w] for w in p.labels]) for p in data]
    splits = {p.split for p in data}
    if len(splits) != 1:
        raise ValueError(f"data: one batch draws its images from one split, got {sorted(splits)}")
    pixels = _render(splits.pop(), [i for p in data for i in p.items], [c for p in data for c in p.cells])
    return dict(vlm.left_pad(ids), pixel_values=pixels, answer=torch.tensor([WORDS.index(p.answer) for p in data]))


def model_inputs(x: dict) -> dict:
    """The model's arguments from a :func:`batch` (which also carries ``answer``)."""
    return {k: x[k] for k in ("input_ids", "attention_mask", "pixel_values")}


@torch.no_grad()
def accuracy(model, shots: int, n: int = 200, batch_size: int = 16, seed: int = 0) -> float:
    """Share of :func:`prompts` ``(shots, n, seed=seed)`` (held-out images) whose argmax over :data:`WORDS` at the
    last position is the answer, through the real forward of ``model`` (so a method installed with
    ``prunelab.apply`` acts on it)."""
    hits, device = 0, next(model.parameters()).device
    data = prompts(shots, n, seed=seed)
    for i in range(0, n, batch_size):
        x = batch(data[i:i + batch_size])
        inputs = {k: v.to(device) for k, v in model_inputs(x).items()}
        logits = model(**inputs, logits_to_keep=1).logits[:, -1, word_ids().to(device)]
        hits += int((logits.argmax(-1).cpu() == x["answer"]).sum())
    return hits / n


# -- the model ------------------------------------------------------------------------------------------------------
def build(seed: int = 0):
    """The untrained test-bed (fp32, eval) and its tokenizer."""
    import transformers as tf

    torch.manual_seed(seed)
    config = vlm.llava_config(vocab_size=len(vocabulary()), max_position_embeddings=MAX_POSITIONS)
    return tf.LlavaForConditionalGeneration(config).eval(), tokenizer()


def from_vlm(seed: int = 0, word_norm: float = 0.0):
    """:func:`build` with the VLM test-bed's base weights (stages A-B, ``vlm.BASE_WEIGHTS``; the old ids are the same
    words); the new words keep their random output rows, and with ``word_norm`` their input embeddings are redrawn:
    a direction shared by all label words plus one of their own, at that norm.

    Why a large norm: the projected image features arrive with norm about 70 and text positions carry about 40
    after the first layer, while the VLM's word embeddings have norm 0.5; a label word at that scale is 1 % of its own
    residual stream, and the query can only copy a word whose identity survives there. Why a shared part: a head
    that attends to every label word at once (the first thing worth learning: the answer is one of them) needs a
    feature they have in common."""
    model, tok = build(seed)
    vlm.extend_from(model, vlm.load(base=True)[0])
    if word_norm:
        with torch.no_grad():
            rows = model.get_input_embeddings().weight[-len(WORDS):]
            own = F.normalize(torch.randn(rows.shape), dim=-1) + F.normalize(torch.randn(rows.shape[1]), dim=-1)
            rows.copy_(word_norm * F.normalize(own, dim=-1))
    return model, tok


def load(path: str | Path | None = None, *, check: bool = True):
    """The trained test-bed (fp32, eval) and its tokenizer from ``path`` (default: the shipped :data:`WEIGHTS`,
    checked against :data:`SHA256`); a file trained with another vocabulary is refused."""
    return shipped.load_with_vocabulary(build, path, WEIGHTS, SHA256, COMMAND, vocabulary(), check=check)


# -- training -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Recipe:
    """The training settings; the defaults are the shipped weights'.

    Attributes:
        steps: optimiser steps on image prompts.
        tokens: prompt tokens per step; a step's prompts share one shot count (no padding), so a step holds
            ``tokens // prompt length`` prompts (about 30 at one shot, 6 at eight).
        text_steps, text_tokens: the warm-up before: prompts whose images are their class names (one token), where
            a step of 4k tokens holds 100 to 500 prompts, so the induction circuit (match the query's class, copy
            the label after it) forms at a fraction of the cost; the class probes, shared by both stages, put the
            class where the image stage's circuit will look for it.
        shots: the range of shot counts drawn uniformly per step.
        lr, weight_decay, warmup: AdamW with linear warm-up over that share of the steps and cosine decay.
        probe: weight of the auxiliary losses: linear probes name the garment class of an image from the hidden
            state at its ``:`` after layer ``probes[0]`` and at its label word after layer ``probes[1]``, so the
            class is gathered where the label sits (the first half of an induction circuit; the label loss
            teaches the second: the query's ``:`` attends to the word whose class matches and copies it).
        word_norm: the norm of the new words' input embeddings at the start (:func:`from_vlm`).
        per_cell: training composites in the tower-feature pool per (class, cell): 10 x 9 x ``per_cell`` distinct
            training images.
        bf16: autocast the language model to bfloat16 (twice as fast on a CPU with AVX-512 BF16).
    """

    steps: int = 900
    tokens: int = 8192
    text_steps: int = 200
    text_tokens: int = 4096
    shots: tuple[int, int] = (1, MAX_SHOTS)
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.05
    probe: float = 0.5
    probes: tuple[int, int] = (1, 2)
    word_norm: float = 40.0
    per_cell: int = 60
    bf16: bool = True
    seed: int = 0


class Pool(NamedTuple):
    """Tower features of single-garment training composites: ``features`` fp16 [N, 144, 192], ``classes`` [N]."""

    features: torch.Tensor
    classes: np.ndarray

    def by_class(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.classes == c) for c in range(CLASSES)]


@torch.no_grad()
def feature_pool(model, per_cell: int, *, split: str = "train", seed: int = 0, chunk: int = 128) -> Pool:
    """The tower features of ``per_cell`` composites per (class, cell), each a distinct image of ``split``."""
    _, by_class = _split(split)
    rng = np.random.default_rng(seed)
    cells = np.tile(np.arange(C.GRID * C.GRID), per_cell)
    items = np.concatenate([rng.choice(by_class[c], size=len(cells), replace=False) for c in range(CLASSES)])
    classes = np.repeat(np.arange(CLASSES), len(cells))
    cells = np.tile(cells, CLASSES)
    feats = [tower_features(model, _render(split, items[i:i + chunk], cells[i:i + chunk])).half()
             for i in range(0, len(items), chunk)]
    return Pool(torch.cat(feats), classes)


def prompt_length(shots: int, block: int = vlm.TOKENS) -> int:
    """Tokens of a prompt with ``shots`` demonstrations whose images take ``block`` tokens each."""
    return shots * (block + 4) + block + 2


class _Batch(NamedTuple):
    input_ids: torch.Tensor  # [B, L], no padding
    images: torch.Tensor  # [B * (shots + 1)] pool rows, prompt by prompt (empty for text prompts)
    targets: torch.Tensor  # [T, 3]: row, position, label token id of every label predictable from its context
    probes: torch.Tensor  # [P, 4]: row, position (an image's ":" or label word), the image's class, which probe


def _training_batch(rng: np.random.Generator, by_class: list[np.ndarray], shots: int, size: int, *,
                    text: bool = False) -> _Batch:
    """``size`` training prompts of ``shots`` demonstrations (classes from :func:`_classes` with ``groups``); with
    ``text``, each image is replaced by its class name (one token), the warm-up stage of :func:`train`."""
    ids, images, targets, probes = [], [], [], []
    words, vocab = word_ids(), vocabulary()
    block = 1 if text else vlm.TOKENS
    for b in range(size):
        classes = _classes(rng, shots, groups=True)
        mapping = words[rng.permutation(len(WORDS))[:CLASSES]]
        labels = [int(mapping[c]) for c in classes]
        if text:
            ids.append(prompt_ids(labels[:-1], [[vocab.index(NAMES[c])] for c in classes]))
        else:
            ids.append(prompt_ids(labels[:-1]))
            images += [int(rng.choice(by_class[c])) for c in classes]
        for j, c in enumerate(classes):
            colon = j * (block + 4) + block + 1  # predicts the label that follows it
            probes += [(b, colon, c, 0)] + ([(b, colon + 1, c, 1)] if j < shots else [])
            if c in classes[:j]:
                targets.append((b, colon, labels[j]))
    return _Batch(torch.tensor(ids), torch.tensor(images, dtype=torch.long), torch.tensor(targets),
                  torch.tensor(probes))


def _losses(model, probes: torch.nn.ModuleList, pool: Pool, x: _Batch, recipe: Recipe
            ) -> tuple[torch.Tensor, dict]:
    """The step's loss (label cross-entropy plus ``recipe.probe`` times the class probes') and its statistics."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
        out = cached_forward(model, x.input_ids, pool.features[x.images].float(), hidden=True)
        logits = model.lm_head(out.last_hidden_state[x.targets[:, 0], x.targets[:, 1]]).float()
        probed = [(head(out.hidden_states[layer + 1][x.probes[k, 0], x.probes[k, 1]]).float(), x.probes[k, 2])
                  for i, (head, layer) in enumerate(zip(probes, recipe.probes)) if (k := x.probes[:, 3] == i).any()]
    label = F.cross_entropy(logits, x.targets[:, 2])
    classes = sum(F.cross_entropy(p, c) for p, c in probed) / len(probed)
    query = x.targets[:, 1] == x.input_ids.shape[1] - 1
    words = word_ids()
    hit = logits[query][:, words].argmax(-1) == (x.targets[query, 2, None] == words).float().argmax(-1)
    return label + recipe.probe * classes, {"label": label.item(), "probe": classes.item(),
                                             "query_acc": hit.float().mean().item()}


def _stage(model, probes, pool: Pool, recipe: Recipe, rng, *, steps: int, text: bool, opt, params, start: float,
           log_every: int) -> list[dict]:
    """One training stage: ``steps`` AdamW steps with their own warm-up and cosine decay."""
    by_class, log, recent = pool.by_class(), [], []
    block = 1 if text else vlm.TOKENS
    tokens = recipe.text_tokens if text else recipe.tokens
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(step / steps, recipe.lr, recipe.warmup)
        shots = int(rng.integers(recipe.shots[0], recipe.shots[1] + 1))
        x = _training_batch(rng, by_class, shots, max(1, tokens // prompt_length(shots, block)), text=text)
        loss, stats = _losses(model, probes, pool, x, recipe)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        recent.append(stats)
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            mean = {k: round(float(np.mean([s[k] for s in recent])), 3) for k in recent[0]}
            log.append({"stage": "text" if text else "images", "step": step + 1,
                        "seconds": round(time.perf_counter() - start), **mean})
            print(json.dumps(log[-1]), flush=True)
            recent = []
    return log


def train(model, recipe: Recipe = Recipe(), *, log_every: int = 25) -> dict:
    """Train ``model`` in place (the tower frozen): ``recipe.text_steps`` on text prompts (class names for images),
    then ``recipe.steps`` on prompts from the tower-feature pool of the training split; returns the training record.
    Deterministic for a torch build, a thread count and ``recipe.seed``."""
    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    pool = feature_pool(model, recipe.per_cell, seed=recipe.seed)
    pool_seconds = time.perf_counter() - start
    width = model.config.text_config.hidden_size
    probes = torch.nn.ModuleList(torch.nn.Linear(width, CLASSES) for _ in recipe.probes)
    model.model.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad] + list(probes.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    rng = np.random.default_rng(recipe.seed + 1)
    model.train()
    common = dict(opt=opt, params=params, start=start, log_every=log_every)
    log = _stage(model, probes, pool, recipe, rng, steps=recipe.text_steps, text=True, **common)
    text_seconds = time.perf_counter() - start - pool_seconds
    log += _stage(model, probes, pool, recipe, rng, steps=recipe.steps, text=False, **common)
    model.eval()
    with torch.no_grad():  # what ships is fp16; the recorded accuracy is the shipped model's
        for t in model.state_dict().values():
            t.copy_(t.half().float())
    return {"recipe": dataclasses.asdict(recipe), "pool": len(pool.classes), "pool_seconds": round(pool_seconds, 1),
            "text_seconds": round(text_seconds, 1), "train_seconds": round(time.perf_counter() - start, 1),
            "log": log, "torch": torch.__version__, "threads": torch.get_num_threads()}


def save(model, info: dict, path: str | Path = WEIGHTS) -> str:
    """Write ``model`` as fp16 safetensors with the vocabulary and ``info`` (JSON) in the metadata; its SHA-256."""
    return shipped.save_with_vocabulary(model, vocabulary(), info, path)


@torch.no_grad()
def agreement(model, shots: int = 2, n: int = 4, seed: int = 0) -> float:
    """The largest difference of the last position's logits between the training path (:func:`cached_forward` on
    :func:`tower_features`) and the full model from pixels, over ``n`` held-out prompts: the check that what was
    trained is what runs."""
    worst = 0.0
    for p in prompts(shots, n, seed=seed):
        x = batch([p])
        full = model(**model_inputs(x), logits_to_keep=1).logits[0, -1]
        h = cached_forward(model, x["input_ids"], tower_features(model, x["pixel_values"])).last_hidden_state
        worst = max(worst, float((model.lm_head(h[0, -1]) - full).abs().max()))
    return worst


def held_out(model, shots: Sequence[int] = (0, 1, 2, 4, 8), n: int = 500, seed: int = 0) -> dict:
    """:func:`accuracy` at each shot count on ``n`` held-out prompts, with the two :func:`chance` baselines."""
    out = {}
    for k in shots:
        uniform, copy = chance(prompts(k, n, seed=seed))
        out[str(k)] = {"accuracy": accuracy(model, k, n, seed=seed), "chance": uniform, "copy_context": copy}
        print(f"{k}-shot: {out[str(k)]}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    """Train the test-bed from the VLM test-bed's base weights, measure it on held-out prompts, write it."""
    parser = argparse.ArgumentParser(prog=COMMAND, description="Train the ICL test-bed and write its weights.")
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it in the last bits)")
    parser.add_argument("--n-eval", type=int, default=500, help="held-out prompts per shot count")
    parser.add_argument("--out", default=str(WEIGHTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = Recipe(steps=args.steps)
    model, _ = from_vlm(recipe.seed, recipe.word_norm)
    info = train(model, recipe)
    info["agreement"] = agreement(model)
    info["held_out"] = held_out(model, n=args.n_eval)
    digest = save(model, info, args.out)
    print(f"trained in {info['train_seconds']:.0f} s (tower features {info['pool_seconds']:.0f} s, text warm-up "
          f"{info['text_seconds']:.0f} s); wrote {args.out}\nsha256 {digest}", flush=True)
    return info


if __name__ == "__main__":
    main()
