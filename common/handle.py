"""The handle of an installed method, and the stack of handles a model carries (see ``prunelab.common.apply``).

Seams build a :class:`Handle` around their undo; :func:`prunelab.apply` stacks them on the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["STACK", "Handle", "UnsupportedModelError", "forget", "handle_of"]

STACK = "_prunelab_handles"  # instance attribute of the model: its handles, the installed one last


class UnsupportedModelError(ValueError):
    """Raised when no adapter in prunelab knows how to install a method into ``model``."""


class Handle:
    """What :func:`apply` returns: ``remove()`` restores the model bit for bit; usable as a context manager."""

    def __init__(self, model: Any, method: Any, undo: Callable[[], None]):
        self.model = model
        self.method = method
        self._undo = undo
        self.removed = False
        self.suspended = False
        self._reinstall: Callable[[], Handle] | None = None

    def remove(self) -> None:
        """Undo this installation; if it was on top of another handle, that one is installed again."""
        if self.removed:
            return
        stack = vars(self.model).get(STACK, [])
        top = bool(stack) and stack[-1] is self
        if not self.suspended:
            self._undo()
        self.removed = True
        if self in stack:
            stack.remove(self)
        if top and stack:
            stack[-1]._resume()
        if not stack:
            forget(self.model)

    def _suspend(self) -> None:
        self._undo()
        self.suspended = True

    def _resume(self) -> None:
        fresh = self._reinstall()  # the seam's own install (set by apply); its state replaces the old one
        keep = {"model", "method", "removed", "_reinstall"}
        vars(self).update({k: v for k, v in vars(fresh).items() if k not in keep})
        self.suspended = False

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def handle_of(model: Any) -> Handle | None:
    """The installed (top) handle of ``model``, or ``None`` when no method is applied."""
    stack = vars(model).get(STACK) if hasattr(model, "__dict__") else None
    return stack[-1] if stack else None


def forget(model: Any) -> dict:
    """Remove the stack and the copy hook from the model's attributes; return them."""
    return {k: vars(model).pop(k) for k in (STACK, "__deepcopy__") if k in vars(model)}
