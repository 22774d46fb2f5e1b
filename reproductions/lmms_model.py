"""The lmms-eval model ``prunelab``: any prunelab VLM method on LLaVA-1.5, LLaVA-NeXT or Qwen2.5-VL.

Installed with the ``eval`` extra (``pip install -e .[eval]``), prunelab registers this model through lmms-eval's
``lmms_eval.models`` entry point, so the stock command line runs it::

    lmms-eval --model prunelab --tasks pope,gqa --batch_size 1 \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=divprune,budget=64

``model_args``: ``pretrained``, ``method`` (dense, or a VLM method or baseline of ``prunelab list``: divprune,
hiprune, random_prune), ``revision``, ``dtype``
(auto / float16 / bfloat16 / float32), ``device``, ``attn_implementation``, ``min_pixels`` / ``max_pixels``
(Qwen2.5-VL's processor), ``shots`` / ``shot_split`` / ``shot_seed`` / ``shot_answer`` (in-context demonstrations,
below), and every other key is a field of the method object (``budget``,
``official_quirks``, ``anchor_ratio``...; lmms-eval turns ``64`` into an int and ``0.098`` into a float).
Requests are grouped by generation arguments and run ``batch_size`` at a time (left padding);
``loglikelihood`` runs one request at a time. This module imports lmms-eval; :mod:`.vlm_eval` does the work.

Multimodal in-context learning (``shots=k``): before each question, ``k`` demonstrations of the same task, each with
its images, its question (the task's ``doc_to_text``) and its answer (the document field ``shot_answer``, else
``doc_to_target``, else the document's ``answers``; of a list of answers, the most frequent), as earlier chat turns.
They are drawn at random (:func:`~prunelab.reproductions.vlm_eval.draw_shots`, ``shot_seed``) from ``shot_split``,
by default the task's ``fewshot_split`` or ``training_split`` when its dataset holds one, else the evaluated split
without the question itself (lmms-lab's copies of VQAv2, OK-VQA and others hold no training split). The task object
is reached through the request's ``doc_to_visual``, a method of it. lmms-eval's own ``num_fewshot`` adds text-only
demonstrations and is not used for this.
"""

from __future__ import annotations

import collections
import json

import torch
from lmms_eval.api.model import lmms
from tqdm import tqdm

from prunelab.reproductions.vlm_eval import PrunedVLM, draw_shots, load_vlm, make_vlm_method

__all__ = ["PrunelabLMM", "manifest", "shot_answer"]


def manifest():
    """The entry point payload lmms-eval reads (group ``lmms_eval.models`` in pyproject.toml): a ``ModelManifest``,
    imported here and not at the top, so that importing this module first does not start lmms-eval's model registry
    (which imports this module for its entry points) halfway through this module."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="prunelab", simple_class_path="prunelab.reproductions.lmms_model.PrunelabLMM")


class PrunelabLMM(lmms):
    """lmms-eval's model interface over :class:`~prunelab.reproductions.vlm_eval.PrunedVLM`."""

    is_simple = True

    def __init__(self, pretrained: str, method: str = "dense", revision: str | None = None, dtype: str = "auto",
                 device: str | None = None, batch_size: int | str = 1, attn_implementation: str = "sdpa",
                 min_pixels: int | None = None, max_pixels: int | None = None, shots: int = 0,
                 shot_split: str | None = None, shot_seed: int = 0, shot_answer: str | None = None,
                 **method_kwargs) -> None:
        super().__init__()
        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
            raise ValueError(f"shots: expected an int >= 0, got {shots!r}")
        self.shots, self.shot_split, self.shot_seed, self.shot_answer = shots, shot_split, int(shot_seed), shot_answer
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        model, processor = load_vlm(pretrained, revision=revision, dtype=dtype, device=device,
                                    attn_implementation=attn_implementation, **pixels)
        self.vlm = PrunedVLM(model, processor, make_vlm_method(method, model, **method_kwargs))
        self.batch_size_per_gpu = batch_size
        self.pretrained, self.method_name = pretrained, method
        self._rank, self._world_size = 0, 1

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        if any(not hasattr(v, "convert") for v in visuals):
            raise ValueError(f"prunelab model: task {task!r} gives non-image visuals (video or audio); only images "
                             "are supported")
        return [v.convert("RGB") for v in visuals]

    def _shots(self, doc_to_visual, doc_id, task, split) -> list[tuple]:
        """The in-context demonstrations of one request: (images, question, answer) per demonstration."""
        if not self.shots:
            return []
        owner = getattr(doc_to_visual, "__self__", None)
        if owner is None or not hasattr(owner, "doc_to_text") or not hasattr(owner, "doc_to_target"):
            raise ValueError(f"shots: task {task!r} does not pass its task object with its requests (its "
                             "doc_to_visual is not a method of it), so demonstrations cannot be built")
        splits = self.task_dict[task]
        if self.shot_split is not None and self.shot_split not in splits:
            raise ValueError(f"shot_split: task {task!r} has the splits {sorted(splits)}, not {self.shot_split!r}")
        pool_split = self.shot_split or next((s for s in (owner.config.fewshot_split, owner.config.training_split)
                                              if s and s in splits), split)
        pool = splits[pool_split]
        picks = draw_shots(len(pool), self.shots, seed=self.shot_seed, key=f"{task}/{split}/{doc_id}",
                           exclude=doc_id if pool_split == split else None)
        out = []
        for i in picks:
            doc = pool[i]
            visuals = [v.convert("RGB") for v in (owner.doc_to_visual(doc) or []) if v is not None]
            out.append((visuals, owner.doc_to_text(doc), shot_answer(owner, doc, task, self.shot_answer)))
        return out

    def generate_until(self, requests) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), desc=f"prunelab {self.method_name}", disable=self.rank != 0)
        for idx in groups.values():
            gen = dict(requests[idx[0]].args[1])
            until = gen.pop("until", [])
            kwargs = dict(max_new_tokens=int(gen.get("max_new_tokens", 128)),
                          until=[until] if isinstance(until, str) else list(until),
                          temperature=float(gen.get("temperature", 0.0) or 0.0), top_p=gen.get("top_p"),
                          num_beams=int(gen.get("num_beams", 1)))
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                args = [requests[i].args for i in chunk]
                images = [self._visuals(a[2], a[3], a[4], a[5]) for a in args]
                shots = [self._shots(a[2], a[3], a[4], a[5]) for a in args]
                answers = self.vlm.generate([a[0] for a in args], images, shots=shots, **kwargs)
                for i, a, ans in zip(chunk, args, answers):
                    out[i] = ans
                    self.cache_hook.add_partial("generate_until", (a[0], a[1]), ans)
                pbar.update(len(chunk))
        pbar.close()
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        res = []
        for r in tqdm(requests, desc=f"prunelab {self.method_name} loglikelihood", disable=self.rank != 0):
            context, target, doc_to_visual, doc_id, task, split = r.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            res.append(self.vlm.loglikelihood(context, continuation, self._visuals(doc_to_visual, doc_id, task, split),
                                              self._shots(doc_to_visual, doc_id, task, split)))
        return res

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("prunelab model: multi-round generation is not supported")


def shot_answer(owner, doc: dict, task: str, field: str | None = None) -> str:
    """A demonstration's answer: the document's ``field``, else the task's ``doc_to_target``, else (a target
    template that names no field) the document's ``answers``; of a list of answers (VQA's ten human answers), the
    most frequent, ties to the first. ``owner`` is the lmms-eval task."""
    if field is not None and field not in doc:
        raise ValueError(f"shot_answer: task {task!r} documents have no field {field!r} (fields: {sorted(doc)})")
    if field is not None:
        answer = doc[field]
    else:
        answer, target = owner.doc_to_target(doc), owner.config.doc_to_target
        if isinstance(target, str) and answer == target and target not in doc:  # a template naming no field
            if "answers" not in doc:
                raise ValueError(f"shot_answer: task {task!r}'s doc_to_target {target!r} is no field of its "
                                 f"documents (fields: {sorted(doc)}); name the answer field with shot_answer")
            answer = doc["answers"]
    if isinstance(answer, (list, tuple)):
        texts = [a["answer"] if isinstance(a, dict) else a for a in answer]
        if not texts:
            raise ValueError(f"shot_answer: a document of task {task!r} has an empty answer list")
        answer = collections.Counter(texts).most_common(1)[0][0]
    return str(answer)
