"""``prunelab.apply``: install a method into a model through its backbone's seam, and undo it.

A model carries a stack of handles (an instance attribute). Only the top one is installed; the ones below are
suspended (undone) and come back, freshly installed, when the handle above them is removed. So

- applying a method equal to the installed one stacks a copy: applying twice equals applying once, and removing
  the inner handle leaves the outer one working;
- applying a different method is an explicit choice: ``on_existing="replace"`` runs it in place of the installed
  one until its handle is removed (nested ``with`` blocks); ``"compose"`` runs both (VLM stage plans: the
  installed method's stages, then the new one's; and at most one KV-cache method on a VLM's language model,
  through the decoder seam beside the engine, e.g. HiPrune with FASA); the default ``"error"`` refuses;
- ``copy.deepcopy(model)`` gives a copy with the same methods applied through its own handles
  (:func:`handle_of` returns them), and the original keeps its own.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from prunelab.common.decoder import install_decoder, is_hf_decoder
from prunelab.common.handle import STACK, Handle, UnsupportedModelError, forget, handle_of
from prunelab.common.validate import check_choice, check_method
from prunelab.common.vit import install_vit, is_timm_vit
from prunelab.common.vlm import install_vlm, is_hf_vlm
from prunelab.common.vlm_methods import Composed

__all__ = ["ON_EXISTING", "Handle", "UnsupportedModelError", "apply", "handle_of"]

ON_EXISTING = ("error", "replace", "compose")


def _install(model: Any, method: Any) -> Handle:
    """Pick the seam for ``model`` and install ``method`` through it."""
    seam = getattr(model, "prunelab_seam", None)
    if callable(seam):  # a host prunelab builds itself brings its own seam (methods/dtop's Segmenter)
        return seam(method)
    if is_timm_vit(model):
        return install_vit(model, method)
    if is_hf_vlm(model):  # before the decoder check, which any transformers model passes
        return _install_on_vlm(model, method)
    if is_hf_decoder(model):
        return install_decoder(model, method)
    raise UnsupportedModelError(
        f"model: prunelab has no adapter for {type(model).__module__}.{type(model).__name__}; "
        "supported: timm VisionTransformer (deit_*, vit_*); transformers Llama, Qwen2, Qwen3 and Mistral "
        "decoders; LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL; prunelab's Segmenter"
    )


def _parts(method: Any) -> list:
    return _parts(method.first) + _parts(method.second) if isinstance(method, Composed) else [method]


def _is_kv(method: Any) -> bool:
    """A decode-time KV-cache method (the decoder seam) rather than a visual-token one."""
    return hasattr(method, "decoder_handler") and not (hasattr(method, "vlm_plan") or hasattr(method, "vlm_select"))


def _install_on_vlm(model: Any, method: Any) -> Handle:
    """Visual-token methods through the VLM engine; a KV-cache method on the VLM's language model through the
    decoder seam, beside them (e.g. HiPrune composed with FASA)."""
    parts = _parts(method)
    kv = [p for p in parts if _is_kv(p)]
    if not kv:
        return install_vlm(model, method)
    if len(kv) > 1:
        raise ValueError(f"method: {len(kv)} KV-cache methods ({', '.join(type(p).__name__ for p in kv)}) cannot "
                         "share one language model's cache; compose at most one")
    visual = [p for p in parts if not _is_kv(p)]
    seams = []
    try:
        if visual:
            seams.append(install_vlm(model, functools.reduce(Composed, visual)))
        seams.append(install_decoder(model, kv[0]))
    except BaseException:
        for h in reversed(seams):
            h._undo()
        raise
    handle = Handle(model, method, lambda: [h._undo() for h in reversed(seams)])
    for h in seams:  # the VLM engine's state and plan, the decoder's spec and handler
        vars(handle).update({k: v for k, v in vars(h).items() if k in ("family", "plan", "state", "spec", "handler")})
    return handle


def _deepcopy(model: Any, memo: dict) -> Any:
    """``copy.deepcopy`` of a model with methods applied: copy it clean, then apply the same stack to the copy."""
    stack = list(vars(model)[STACK])
    stack[-1]._suspend()
    saved = forget(model)
    try:
        clone = copy.deepcopy(model, memo)
    finally:
        vars(model).update(saved)
        stack[-1]._resume()
    for i, h in enumerate(stack):
        apply(clone, h.method, on_existing="replace" if i else "error")
    return clone


def apply(model: Any, method: Any, *, on_existing: str = "error") -> Handle:
    """Install ``method`` into ``model`` and return a :class:`Handle`.

    Args:
        model: a supported model (timm ViT, transformers decoder or VLM).
        method: a method *instance*.
        on_existing: what to do when ``model`` already has a different method applied: ``"error"`` (default)
            raises; ``"replace"`` suspends it while the new handle lives; ``"compose"`` installs both (VLMs: the
            plans run in order) until the new handle is removed. An equal method is always stacked (applying
            twice equals applying once).
    """
    check_method(method)
    check_choice(on_existing, "on_existing", ON_EXISTING)
    stack = vars(model).setdefault(STACK, [])
    top = stack[-1] if stack else None
    if top is not None and on_existing == "error" and top.method != method:
        raise ValueError(
            f"method: the model already has {type(top.method).__name__} applied; remove its handle first, or pass "
            f"on_existing='replace' to run {type(method).__name__} in its place (or 'compose' to run both) until "
            "the new handle is removed"
        )
    if top is not None and on_existing == "compose":
        if not is_hf_vlm(model):
            raise ValueError("on_existing: 'compose' combines VLM stage plans (and one KV-cache method on a VLM's "
                             "language model); use 'replace' on this model")
        method = Composed(top.method, method)
    if top is not None:
        top._suspend()
    try:
        handle = _install(model, method)
    except BaseException:
        if top is not None:
            top._resume()
        elif not stack:
            forget(model)
        raise
    handle._reinstall = lambda: _install(model, handle.method)
    stack.append(handle)
    # copy.deepcopy looks __deepcopy__ up on the instance: a copy gets its own installation, not our hooks
    vars(model)["__deepcopy__"] = lambda memo: _deepcopy(model, memo)
    return handle
