"""The lm-evaluation-harness model ``prunelab_dlm``: generative tasks through Window-Diffusion's samplers.

Paper: Zuo et al., "Window-Diffusion: Accelerating Diffusion Language Model Inference with Windowed Token Pruning and
Caching", arXiv 2601.20332, which evaluates LLaDA-8B-Base and Dream-v0-Base-7B with lm-evaluation-harness (the
``eval`` extra). Compared against the release's adapters, vhicrgit/Window-Diffusion at d8bb349 (``llada/eval.py``,
``dream/eval.py``); that repository has no licence, nothing was copied.

Every ``generate_until`` request is answered by one of four samplers, chosen by ``method`` and by the model's family
(:attr:`DiffusionLM.shift_logits` marks Dream) through the method's sampler seam: ``vanilla``
(:func:`vanilla_generate`) is LLaDA's single-block low-confidence sampler or Dream's full-step loop; ``window``
(:func:`windowed_generate`) is Window-Diffusion with :class:`WindowDiffusion` (LLaDA) or :class:`DreamWindow`
(Dream). As in the release's adapters:

- the answer has ``gen_length`` positions whatever the task's ``max_gen_toks`` says (a diffusion LM denoises a fixed
  length; ``steps`` defaults to it, one token per step), temperature 0 unless set here (the task's ``temperature`` and
  ``do_sample`` are not read);
- prompts: LLaDA's are tokenized with the tokenizer's own special tokens (``llada/eval.py``), Dream's get the BOS
  token in front and no other special token (``dream/eval.py``, ``add_bos_token=true`` in its scripts); a prompt
  longer than ``max_length - gen_length`` keeps its last tokens (as Dream's adapter; LLaDA's tokenizer call cuts the
  end instead, which the paper's tasks, far shorter, never reach);
- the answer is cut at its first EOS token, decoded without special tokens, then cut at the first occurrence of each
  of the request's ``until`` strings, in order (lm-eval's stop sequences, applied after generation).

What differs: batches. Requests run ``batch_size`` at a time, longest prompts first so that similar lengths share a
batch (left padding, which the samplers never attend); the release runs batch 1.

Per request, :attr:`DiffusionLMEval.records` holds the wall-clock seconds (a batch's time split evenly over its
rows, the device synchronised), the prompt length, the answer positions decoded (``gen_tokens``), the tokens before
the first EOS, and the tokens the model computed and their MACs per row of the batch, as the sampler's
``Generation.log`` counts them (:func:`run_macs`). ``loglikelihood`` requests are refused: diffusion LMs are
evaluated generatively here.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from prunelab.common.validate import check_bool, check_choice, check_int, check_real
from prunelab.methods.window_diffusion import (
    DiffusionLM,
    DreamWindow,
    WindowDiffusion,
    method_for,
    run_macs,
    vanilla_generate,
    windowed_generate,
)

from .full import detect_family, load_model, load_tokenizer

NAME = "prunelab_dlm"
METHODS = ("vanilla", "window")

__all__ = ["NAME", "METHODS", "SampleRecord", "DiffusionLMEval", "apply_until"]


def apply_until(text: str, until) -> str:
    """``text`` cut at the first occurrence of each stop string of ``until`` (a string or a list), in order."""
    for stop in [until] if isinstance(until, str) else list(until or ()):
        if stop:
            text = text.split(stop)[0]
    return text


@dataclass
class SampleRecord:
    """One request's measurements (module docstring)."""

    task: str
    doc_id: int
    prompt_tokens: int
    seconds: float
    gen_tokens: int
    answer_tokens: int
    forward_tokens: float
    macs: float
    batch: int
    response: str


@register_model(NAME)
class DiffusionLMEval(LM):
    """lm-eval's model interface over a :class:`DiffusionLM` and one sampler (module docstring).

    Args:
        model_dir: a local LLaDA or Dream folder, loaded with ``dtype`` on ``device``; or pass ``model`` and
            ``tokenizer`` already loaded.
        family: ``"llada"`` or ``"dream"``; None: from ``config.json`` (a passed ``model``: from its
            ``shift_logits``).
        method: ``"vanilla"`` or ``"window"``.
        gen_length: the answer length G (the official LLaDA / Dream scripts: 256 or 512 per task).
        steps: denoising steps; None: G.
        window_tokens, active_tokens, refresh_cycle: Window-Diffusion's settings; None: the family's defaults
            (LLaDA 64 / 16 / 32, :class:`WindowDiffusion`; Dream 128 / 16 / 32, :class:`DreamWindow`).
        slide_window: Dream's sliding inner window.
        temperature, early_stop: both families' samplers (the paper's Base evaluations: 0 and no early stop);
            ``remasking``: LLaDA's; ``top_p``, ``top_k``: Dream's.
        add_bos_token: put the BOS token before the prompt instead of the tokenizer's special tokens; None: Dream
            only.
        max_length: prompt plus answer tokens (prompts are cut on the left to fit).
        batch_size: requests per sampler call; ``max_batch_size`` is accepted and ignored (lm-eval passes it).
        seed: the random source of ``temperature > 0``.
        progress: a progress bar over the requests.
    """

    def __init__(self, model_dir: str | None = None, *, model: DiffusionLM | None = None, tokenizer=None,
                 family: str | None = None, method: str = "window", gen_length: int = 256, steps: int | None = None,
                 window_tokens: int | None = None, active_tokens: int | None = None, refresh_cycle: int | None = None,
                 slide_window: bool = True, temperature: float = 0.0, remasking: str = "low_confidence",
                 top_p: float | None = None, top_k: int | None = None, early_stop: bool = False,
                 add_bos_token: bool | None = None, max_length: int = 4096, batch_size: int | str = 1,
                 max_batch_size: int | None = None, device: str | None = None, dtype: str = "bfloat16",
                 seed: int = 1234, progress: bool = True) -> None:
        super().__init__()
        self.method = check_choice(method, "method", METHODS)
        self.gen_length = check_int(int(gen_length), "gen_length", low=1)
        self.steps = self.gen_length if steps is None else check_int(int(steps), "steps", low=1, high=self.gen_length)
        self.max_length = check_int(int(max_length), "max_length", low=self.gen_length + 1)
        self.batch_size_per_call = check_int(int(batch_size), "batch_size", low=1)
        self.temperature = check_real(float(temperature), "temperature", low=0.0)
        self.remasking, self.top_p = remasking, None if top_p is None else float(top_p)
        self.top_k = None if top_k is None else int(top_k)
        self.early_stop = check_bool(early_stop, "early_stop")
        if model is None:
            if model_dir is None:
                raise ValueError("model_dir: give a local LLaDA / Dream folder, or pass model and tokenizer")
            family = family or detect_family(model_dir)
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model, tokenizer = load_model(model_dir, family, dtype, device), tokenizer or load_tokenizer(model_dir)
        elif tokenizer is None:
            raise ValueError("tokenizer: a passed model needs its tokenizer")
        if not isinstance(model, DiffusionLM):
            raise TypeError(f"model: expected a DiffusionLM, got {type(model).__name__}")
        self.family = family or ("dream" if model.shift_logits else "llada")
        if (self.family == "dream") != model.shift_logits:
            raise ValueError(f"family: {self.family!r} does not fit the model (shift_logits={model.shift_logits})")
        self.model, self.tokenizer = model, tokenizer
        self._device = next(model.parameters()).device
        self.add_bos_token = self.family == "dream" if add_bos_token is None else check_bool(add_bos_token,
                                                                                             "add_bos_token")
        settings = {k: int(v) for k, v in (("window_tokens", window_tokens), ("active_tokens", active_tokens),
                                           ("refresh_cycle", refresh_cycle)) if v is not None}
        if self.family == "dream":
            settings["slide_window"] = check_bool(slide_window, "slide_window")
            if self.method == "vanilla" and self.steps != self.gen_length:
                raise ValueError(f"steps: Dream's vanilla loop decodes one token per step (steps = gen_length = "
                                 f"{self.gen_length}), got {self.steps}")
        self.window: WindowDiffusion | DreamWindow = method_for(model, **settings)
        self.eos_ids = {i for i in (model.eos_id, tokenizer.eos_token_id) if i is not None}
        self.generator = torch.Generator(device=self._device).manual_seed(int(seed))
        self.progress = progress
        self.records: list[SampleRecord] = []
        self.truncated = 0  # prompts cut on the left to fit max_length

    # -- lm-eval's interface ------------------------------------------------------------------------------------------
    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_call

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def get_model_info(self) -> dict:
        """What lm-eval writes into its results' ``config``."""
        return {"family": self.family, "method": self.method, "gen_length": self.gen_length, "steps": self.steps,
                "batch_size": self.batch_size_per_call, "window": asdict(self.window) if self.method == "window"
                else None, "temperature": self.temperature}

    def loglikelihood(self, requests):
        self._refuse(requests, "loglikelihood")

    def loglikelihood_rolling(self, requests):
        self._refuse(requests, "loglikelihood_rolling")

    def _refuse(self, requests, kind: str):
        tasks = sorted({getattr(r, "task_name", None) or "?" for r in requests})
        raise NotImplementedError(f"{NAME}: {kind} requests (task {', '.join(tasks)}) are not supported: diffusion LMs "
                                  "are evaluated generatively here; choose generate_until tasks (gsm8k, minerva_math, "
                                  "humaneval, mbpp)")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """One answer per request, in the requests' order (module docstring)."""
        prompts = [self.encode(req.args[0]) for req in requests]
        order = sorted(range(len(requests)), key=lambda i: -len(prompts[i]))
        width = self.batch_size_per_call
        answers: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc=f"{NAME} {self.family} {self.method}",
                   disable=disable_tqdm or not self.progress)
        for start in range(0, len(order), width):
            rows = order[start:start + width]
            seconds, gen = self._timed([prompts[i] for i in rows])
            macs = run_macs(self.model.config, gen.log)
            for b, i in enumerate(rows):
                ids = gen.answer[b].tolist()
                cut = next((j for j, t in enumerate(ids) if t in self.eos_ids), len(ids))
                context, gen_kwargs = requests[i].args
                text = apply_until(self.tokenizer.decode(ids[:cut], skip_special_tokens=True),
                                   (gen_kwargs or {}).get("until"))
                answers[i] = text
                doc_id = getattr(requests[i], "doc_id", None)
                self.records.append(SampleRecord(
                    task=str(getattr(requests[i], "task_name", None) or ""), doc_id=i if doc_id is None else doc_id,
                    prompt_tokens=len(prompts[i]), seconds=seconds / len(rows), gen_tokens=self.gen_length,
                    answer_tokens=cut, forward_tokens=float(gen.forward_tokens), macs=float(macs), batch=len(rows),
                    response=text))
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            bar.update(len(rows))
        bar.close()
        return answers

    # -- the work -----------------------------------------------------------------------------------------------------
    def encode(self, context: str) -> list[int]:
        """Prompt ids of ``context`` (module docstring), cut on the left to ``max_length - gen_length``."""
        if self.add_bos_token:
            ids = self.tokenizer(context, add_special_tokens=False)["input_ids"]
            if self.tokenizer.bos_token_id is not None:
                ids = [self.tokenizer.bos_token_id, *ids]
        else:
            ids = self.tokenizer(context, add_special_tokens=True)["input_ids"]
        room = self.max_length - self.gen_length
        self.truncated += len(ids) > room
        return list(ids[-room:])

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _timed(self, prompts: list[list[int]]):
        self._sync()
        start = time.perf_counter()
        gen = self.sample(prompts)
        self._sync()
        return time.perf_counter() - start, gen

    def sample(self, prompts: list[list[int]]):
        """The :class:`~prunelab.methods.window_diffusion.Generation` of one batch of prompt ids."""
        kwargs = {"temperature": self.temperature, "early_stop": self.early_stop, "generator": self.generator}
        if self.family == "dream":
            kwargs.update(top_p=self.top_p, top_k=self.top_k)  # Dream's vanilla loop has one step per token
        else:
            kwargs.update(remasking=self.remasking, steps=self.steps)
        if self.method == "vanilla":
            return vanilla_generate(self.model, prompts, self.gen_length, **kwargs)
        kwargs.setdefault("steps", self.steps)
        return windowed_generate(self.model, prompts, self.gen_length, self.window, **kwargs)
