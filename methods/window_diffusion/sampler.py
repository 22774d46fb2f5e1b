"""The sampler seam: Window-Diffusion is not installed into a model but wraps its generation loop.

A diffusion LM's family decides both loops: LLaDA-style models (unshifted logits) run LLaDA's low-confidence sampler
and Window-Diffusion's LLaDA scheduler; Dream-style models (``shift_logits=True``) run Dream's leftmost-mask loop and
the Dream release's windowed path. These three functions are what the registry, the presets, the lm-eval adapter and
the invariant tests call, so they all pick the loop the same way.
"""

from __future__ import annotations

from typing import Any

from prunelab.methods.window_diffusion.dream import dream_generate
from prunelab.methods.window_diffusion.dream_window import DreamWindow, dream_window_generate
from prunelab.methods.window_diffusion.method import WindowDiffusion, window_generate
from prunelab.methods.window_diffusion.model import DiffusionLM
from prunelab.methods.window_diffusion.samplers import Generation, llada_generate

__all__ = ["method_for", "vanilla_generate", "windowed_generate"]


def _model(model: Any) -> DiffusionLM:
    if not isinstance(model, DiffusionLM):
        raise TypeError(f"model: expected a prunelab DiffusionLM (LLaDA- or Dream-style), got {type(model).__name__}")
    return model


def method_for(model: DiffusionLM, **settings) -> WindowDiffusion | DreamWindow:
    """The method's settings object for ``model``'s family: :class:`DreamWindow` for shifted (Dream) logits, else
    :class:`WindowDiffusion`; ``settings`` are its fields."""
    return (DreamWindow if _model(model).shift_logits else WindowDiffusion)(**settings)


def vanilla_generate(model: DiffusionLM, prompts, gen_length: int, **kwargs) -> Generation:
    """The sampler Window-Diffusion accelerates: :func:`~.samplers.llada_generate`, or for Dream models
    :func:`~.dream.dream_generate` (``kwargs`` go to it)."""
    run = dream_generate if _model(model).shift_logits else llada_generate
    return run(model, prompts, gen_length, **kwargs)


def windowed_generate(model: DiffusionLM, prompts, gen_length: int, method: WindowDiffusion | DreamWindow | None = None,
                      **kwargs) -> Generation:
    """Window-Diffusion with ``method`` (default: the family's release settings) on ``model``."""
    method = method_for(model) if method is None else method
    dream = _model(model).shift_logits
    if isinstance(method, DreamWindow) != dream:
        raise TypeError(f"method: {type(method).__name__} does not run a {'Dream' if dream else 'LLaDA'}-style model; "
                        f"use {'DreamWindow' if dream else 'WindowDiffusion'} (or method_for(model))")
    run = dream_window_generate if dream else window_generate
    return run(model, prompts, gen_length, method, **kwargs)
