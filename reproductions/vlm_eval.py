"""A pruned VLM as an evaluator sees it: load a checkpoint, apply a prunelab method, answer prompts with images.

:class:`PrunedVLM` is what the lmms-eval model ``prunelab`` (:mod:`prunelab.reproductions.lmms_model`) wraps; it
has no lmms-eval dependency, so it is tested on its own. It loads LLaVA-1.5 (``llava``), LLaVA-NeXT
(``llava_next``) or Qwen2.5-VL (``qwen2_5_vl``) checkpoints through transformers' own classes and processors
(a hub id, or a local folder such as :func:`~prunelab.reproductions.vlm_offline.save_tiny_vlm` writes), builds each
prompt with the processor's chat template (the images first, then the question, as lmms-eval's ``llava_hf`` and
``qwen2_5_vl`` models do), and runs ``model.generate`` on a left-padded batch. The method goes in through
``prunelab.apply``, so the same generate() path serves every method and the dense model.

In-context demonstrations (``shots``, multimodal in-context learning as CATP evaluates it) go before the question
as earlier turns of the chat: per demonstration a user turn with its images and question and an assistant turn with
its answer, so a prompt's images are the demonstrations' in order, then the question's.
:func:`draw_shots` picks them reproducibly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import prunelab
from prunelab import registry

__all__ = ["FAMILY_CLASSES", "METHODS", "PrunedVLM", "Shot", "draw_shots", "load_vlm", "make_vlm_method"]

Shot = tuple  # (images: list of PIL images, question: str, answer: str), one in-context demonstration


def draw_shots(pool: int, k: int, *, seed: int, key: str, exclude: int | None = None) -> list[int]:
    """``k`` distinct indices into a pool of ``pool`` documents, drawn uniformly at random, never ``exclude`` (the
    query's own index when the pool is its split): the same for the same ``(seed, key)`` in any process (``key``
    names the query, e.g. ``"task/doc_id"``)."""
    if k < 0:
        raise ValueError(f"shots: expected >= 0, got {k}")
    available = pool - (exclude is not None and 0 <= exclude < pool)
    if k > available:
        raise ValueError(f"shots: {k} demonstrations asked, the pool holds {available} other documents")
    rng = random.Random(f"{seed}/{key}")  # a str seed is hashed with SHA-512: stable across processes
    picks = rng.sample(range(pool), min(pool, k + 1))
    return [i for i in picks if i != exclude][:k]

FAMILY_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                  "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
"""transformers ``model_type`` -> model class, for the three VLM families the seam supports."""

METHODS = ("dense", *(e.name for e in registry.entries() if "vlm" in e.seams))
"""``dense`` (no method) and every registered method and baseline of the VLM seam."""


def make_vlm_method(name: str, model, **kwargs):
    """The method object ``name`` for ``model`` from the registry, its defaults overridden by ``kwargs``; dense: None.

    Methods that read the model first (HiPrune's encoder blocks) are built through their registry entry's
    ``for_model``, exactly as the presets build them.
    """
    if name not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {name!r}")
    if name == "dense":
        if kwargs:
            raise ValueError(f"method: 'dense' takes no method arguments, got {sorted(kwargs)}")
        return None
    cls = registry.get(name).cls
    unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"method: {cls.__name__} has no field(s) {unknown}; its fields are "
                         f"{[f.name for f in dataclasses.fields(cls)]}")
    return registry.build(name, model, **kwargs)


def _dtype(dtype: str | torch.dtype):
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype: expected auto, float32, float16 or bfloat16, got {dtype!r}")
    return getattr(torch, dtype)


def load_vlm(pretrained: str, *, revision: str | None = None, dtype: str | torch.dtype = "auto",
             device: str | torch.device = "cpu", attn_implementation: str = "sdpa", **processor_kwargs):
    """(model, processor) of a LLaVA-1.5, LLaVA-NeXT or Qwen2.5-VL checkpoint, in eval mode on ``device``.

    ``processor_kwargs`` go to ``AutoProcessor.from_pretrained`` (e.g. Qwen2.5-VL's ``max_pixels``).
    The tokenizer pads on the left, as batched generation needs.
    """
    import transformers as tf

    try:
        config = tf.AutoConfig.from_pretrained(pretrained, revision=revision)
    except OSError as e:  # no such folder, and the hub is unreachable or has no such model
        raise OSError(f"pretrained: cannot load {pretrained!r}: not a local model folder, and the hub did not serve "
                      f"it ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    family = getattr(config, "model_type", None)
    if family not in FAMILY_CLASSES:
        raise ValueError(f"pretrained: {pretrained!r} is a {family!r} model; prunelab's VLM seam supports "
                         f"{sorted(FAMILY_CLASSES)}")
    cls = getattr(tf, FAMILY_CLASSES[family])
    model = cls.from_pretrained(pretrained, revision=revision, dtype=_dtype(dtype),
                                attn_implementation=attn_implementation).to(device).eval()
    processor = tf.AutoProcessor.from_pretrained(pretrained, revision=revision, **processor_kwargs)
    processor.tokenizer.padding_side = "left"
    return model, processor


@dataclass
class PrunedVLM:
    """``model`` with ``method`` applied (``None``: dense), answering (question, images) prompts.

    Attributes:
        model: a transformers LLaVA-1.5 / LLaVA-NeXT / Qwen2.5-VL model.
        processor: its processor (chat template, image processor, tokenizer).
        method: a VLM method object (``vlm_select``), or None for the dense model.
    """

    model: object
    processor: object
    method: object = None

    def __post_init__(self):
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError("processor: it has no chat_template; PrunedVLM builds prompts with it")
        self.handle = prunelab.apply(self.model, self.method) if self.method is not None else None

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def prompt(self, question: str, n_images: int, shots: Sequence[Shot] = ()) -> str:
        """The chat prompt for ``question`` after ``n_images`` images, ending with the assistant's turn; the
        in-context demonstrations ``shots`` come first, each a user turn (its images, its question) and an assistant
        turn (its answer)."""
        messages = []
        for images, q, answer in shots:
            messages += [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": q}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
        return self.processor.apply_chat_template([*messages, {"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    def _inputs(self, texts: Sequence[str], images: Sequence):
        images = [im for per_prompt in images for im in per_prompt]
        inputs = self.processor(text=list(texts), images=images or None, return_tensors="pt", padding=True)
        inputs = inputs.to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    @torch.inference_mode()
    def generate(self, questions: Sequence[str], images: Sequence[Sequence], *, max_new_tokens: int = 32,
                 until: Sequence[str] = (), temperature: float = 0.0, top_p: float | None = None,
                 num_beams: int = 1, shots: Sequence[Sequence[Shot]] | None = None) -> list[str]:
        """One answer per question; ``images[i]`` are the PIL images of question ``i`` (may be empty), ``shots[i]``
        its in-context demonstrations (default: none).

        Greedy unless ``temperature > 0``; each answer is cut at the first of the ``until`` strings. Prompts
        without images (some benchmarks mix them in) run on the dense model: there is nothing to prune.
        """
        if len(questions) != len(images):
            raise ValueError(f"images: expected one list per question ({len(questions)}), got {len(images)}")
        shots = [()] * len(questions) if shots is None else list(shots)
        if len(shots) != len(questions):
            raise ValueError(f"shots: expected one list per question ({len(questions)}), got {len(shots)}")
        images = [[im for shot in shots[i] for im in shot[0]] + list(images[i]) for i in range(len(questions))]
        n_query = [len(images[i]) - sum(len(shot[0]) for shot in shots[i]) for i in range(len(questions))]
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        sample = temperature > 0
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sample, num_beams=num_beams,
                      temperature=temperature if sample else None, top_p=top_p if sample else None,
                      pad_token_id=self.tokenizer.pad_token_id)
        answers: list[str] = [""] * len(questions)
        # a text-only question has nothing to prune (the seam refuses it): it runs on the dense model
        for with_images in (True, False):
            idx = [i for i, im in enumerate(images) if bool(len(im)) == with_images]
            if not idx:
                continue
            inputs = self._inputs([self.prompt(questions[i], n_query[i], shots[i]) for i in idx],
                                  [images[i] for i in idx])
            with self._dense_unless(with_images):
                out = self.model.generate(**inputs, **kwargs)
            texts = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, t in zip(idx, texts):
                answers[i] = _cut(t, until)
        return answers

    @contextlib.contextmanager
    def _dense_unless(self, with_images: bool):
        """Take the method off for a text-only forward and put it back afterwards."""
        if with_images or self.handle is None:
            yield
            return
        self.handle.remove()
        try:
            yield
        finally:
            self.handle = prunelab.apply(self.model, self.method)

    @torch.inference_mode()
    def loglikelihood(self, question: str, continuation: str, images: Sequence,
                      shots: Sequence[Shot] = ()) -> tuple[float, bool]:
        """(log p(continuation | prompt), whether greedy decoding would produce it), teacher-forced; ``shots``:
        in-context demonstrations before the question.

        The continuation is text after the prompt, so the method never prunes it; the pruned forward returns
        fewer rows, and the seam's ``state.positions`` says which prompt position each row is.
        """
        prompt = self.prompt(question, len(images), shots)
        images = [im for shot in shots for im in shot[0]] + list(images)
        ctx = self._inputs([prompt], [images])["input_ids"].shape[1]
        inputs = self._inputs([prompt + continuation], [images])
        ids = inputs["input_ids"][0]
        if ids.shape[0] <= ctx:
            raise ValueError(f"continuation: {continuation!r} adds no tokens to the prompt")
        with self._dense_unless(bool(len(images))):
            logits = self.model(**inputs).logits[0].float()
        positions = (self.handle.state.positions[0] if self.handle is not None and len(images)
                     else torch.arange(ids.shape[0], device=ids.device))
        row = torch.full((ids.shape[0],), -1, dtype=torch.long, device=ids.device)
        kept = positions >= 0
        row[positions[kept]] = torch.arange(positions.shape[0], device=ids.device)[kept]
        rows = row[ctx - 1:ids.shape[0] - 1]  # the rows that predict each continuation token
        if bool((rows < 0).any()):
            raise RuntimeError("a prompt position before the continuation was pruned; loglikelihood needs the text "
                               "that predicts the continuation")
        logp = F.log_softmax(logits[rows], -1)
        target = ids[ctx:]
        total = float(logp.gather(1, target[:, None]).sum())
        return (total if math.isfinite(total) else -math.inf), bool((logp.argmax(-1) == target).all())

    def remove(self) -> None:
        """Take the method off the model (the dense model again)."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any non-empty stop string in ``until``."""
    cut = min((text.find(s) for s in until if s and s in text), default=len(text))
    return text[:cut]
