"""``prunelab.apply``: install a method into a model through its backbone's seam, and undo it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class UnsupportedModelError(ValueError):
    """Raised when no adapter in prunelab knows how to install a method into ``model``."""


class Handle:
    """What :func:`apply` returns: ``remove()`` restores the model bit for bit; usable as a context manager."""

    def __init__(self, model: Any, method: Any, undo: Callable[[], None]):
        self.model = model
        self.method = method
        self._undo = undo
        self.removed = False

    def remove(self) -> None:
        if not self.removed:
            self._undo()
            self.removed = True
            if getattr(self.model, "_prunelab_handle", None) is self:
                del self.model._prunelab_handle

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply(model: Any, method: Any) -> Handle:
    """Install ``method`` into ``model`` and return a :class:`Handle`.

    Applying again replaces the previous installation, so applying twice equals applying once.
    """
    from prunelab.common.decoder import install_decoder, is_hf_decoder
    from prunelab.common.vit import install_vit, is_timm_vit
    from prunelab.common.vlm import install_vlm, is_hf_vlm

    previous = getattr(model, "_prunelab_handle", None)
    if previous is not None:
        previous.remove()
    if is_timm_vit(model):
        handle = install_vit(model, method)
    elif is_hf_vlm(model):  # before the decoder check, which any transformers model passes
        handle = install_vlm(model, method)
    elif is_hf_decoder(model):
        handle = install_decoder(model, method)
    else:
        raise UnsupportedModelError(
            f"model: prunelab has no adapter for {type(model).__module__}.{type(model).__name__}; "
            "supported: timm VisionTransformer (deit_*, vit_*); transformers Llama, Qwen2, Qwen3 and Mistral "
            "decoders; LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL"
        )
    model._prunelab_handle = handle
    return handle
