"""The one registry: every method and baseline, read by the CLI, the presets, the lmms-eval model and the tests.

Each package under ``prunelab.methods`` declares its entries in its ``entry.py`` (``ENTRIES``, a tuple of
:class:`MethodEntry`); :data:`PACKAGES` lists the packages, one line per paper. Building a method by name goes
through :func:`build`, so a preset, ``lmms-eval --model prunelab`` and the invariant tests construct it the same
way. Entries import their method package, and so torch: ``prunelab list`` takes a second or two.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# One line per method package (its entry.py); the order is the order of `prunelab list`.
PACKAGES = ("zero_tprune", "dtop", "top_vim", "fasa", "divprune", "hiprune", "flowcut", "visiondrop", "catp",
            "lvlm_csp", "window_diffusion", "baselines")

SEAMS = {
    "vit": "prunelab.common.vit (blocks ask for attention statistics; others keep fused SDPA)",
    "decoder": "prunelab.common.decoder (registered 'prunelab' attention function + in-place KV cache)",
    "vlm": "prunelab.common.vlm (hooks in the vision tower, after the projector, after an LLM layer; "
           "LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL)",
    "vim": "prunelab.methods.top_vim.seam and .plain_seam (pruning points after Vim or PlainMamba blocks; pruned "
           "slots kept in the scans or removed)",
    "segmenter": "prunelab.methods.dtop.seam (early exit after the auxiliary heads of a plain-ViT segmenter; "
                 "ragged batches attended with a key-padding mask)",
    "diffusion": "prunelab.methods.window_diffusion.sampler (a sampler around prunelab's DiffusionLM; the model's own "
                 "attention layers read and write the window's K/V cache through transformers' Cache interface)",
}

@dataclass(frozen=True)
class MethodEntry:
    """One method or baseline as the rest of prunelab sees it.

    Attributes:
        name: the name on the command line and in ``lmms-eval --model_args method=<name>``.
        cls: the method class (a frozen dataclass of its hyperparameters).
        family: "ViT classification", "LLM KV cache", "VLM", ...; baselines carry the family they serve.
        seams: backbone seams it installs through (keys of :data:`SEAMS`).
        paper: the paper, for methods; ``""`` for baselines.
        backbones: the model families it is tested on, in words.
        baselines: names of the baseline entries its presets compare against at the same budget.
        budget: the field a preset's budget (a count or a ratio) goes into.
        for_model: name of a classmethod ``cls.<for_model>(model, **kwargs)`` used when the method must read the
            model (block depths, feature layers) before it is built; ``None``: ``cls(**kwargs)``.
        model_kwargs: ``model -> dict`` of settings a preset adds for a given model (e.g. per-family blocks).
        full: the paper's settings for the full preset, beyond the budget.
        tiny: ``model -> dict`` of settings on the tiny random models of the tests and the VLM tiny presets (FASA's
            calibration of that model; HiPrune's object block in a 3-block tower).
        tiny_budget: ``(model, ratio) -> dict``: the settings that stand for keep ratio ``ratio`` on the tiny models
            where the budget field cannot carry it (VisionDrop's schedule over a 3-layer language model); ``None``:
            ``budget=ratio``.
        keep_all: settings that keep every token (the invariant tests check that this equals the dense model).
        prune: settings that do prune on the tiny test models.
        bad: ``(settings, parameter)`` pairs: each must raise an error naming the parameter.
        reproduction: the package under ``prunelab.reproductions`` with its presets, if any.
        status: one line for ``prunelab list``.
    """

    name: str
    cls: type
    family: str
    seams: tuple[str, ...]
    paper: str = ""
    backbones: tuple[str, ...] = ()
    baselines: tuple[str, ...] = ()
    budget: str = "budget"
    for_model: str | None = None
    model_kwargs: Callable[[Any], dict] | None = None
    full: Mapping[str, Any] = field(default_factory=dict)
    tiny: Callable[[Any], dict] | None = None
    tiny_budget: Callable[[Any, float], dict] | None = None
    keep_all: Mapping[str, Any] = field(default_factory=dict)
    prune: Mapping[str, Any] = field(default_factory=dict)
    bad: tuple[tuple[Mapping[str, Any], str], ...] = ()
    reproduction: str | None = None
    status: str = ""

    def __post_init__(self):
        unknown = [s for s in self.seams if s not in SEAMS]
        if unknown:
            raise ValueError(f"seams: unknown {unknown}; known: {sorted(SEAMS)}")

    @property
    def is_baseline(self) -> bool:
        return not self.paper

    def build(self, model: Any = None, budget: Any = None, **kwargs) -> Any:
        """The method object with ``kwargs`` (and ``budget`` in its budget field), for ``model`` if given."""
        settings = dict(self.model_kwargs(model)) if (self.model_kwargs and model is not None) else {}
        settings.update(kwargs)
        if budget is not None:
            settings[self.budget] = budget
        if self.for_model is not None:
            if model is None:
                raise ValueError(f"model: {self.name} reads the model before it is built; pass model=")
            return getattr(self.cls, self.for_model)(model, **settings)
        return self.cls(**settings)


@functools.cache
def entries() -> tuple[MethodEntry, ...]:
    """Every entry of every package in :data:`PACKAGES`, in order."""
    found = []
    for package in PACKAGES:
        found += importlib.import_module(f"prunelab.methods.{package}.entry").ENTRIES
    names = [e.name for e in found]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RuntimeError(f"registry: names declared twice: {dup}")
    return tuple(found)


def get(name: str) -> MethodEntry:
    """The entry called ``name``; an error lists the known names."""
    for e in entries():
        if e.name == name:
            return e
    raise ValueError(f"method: unknown method {name!r}; known: {', '.join(e.name for e in entries())}")


def build(name: str, model: Any = None, budget: Any = None, **kwargs) -> Any:
    """``get(name).build(model, budget, **kwargs)``: the one way presets and tools construct a method by name."""
    return get(name).build(model, budget, **kwargs)


def methods(family: str | None = None) -> list[MethodEntry]:
    """The papers' methods (baselines left out), optionally of one family."""
    return [e for e in entries() if not e.is_baseline and (family is None or e.family == family)]


BENCHES = ("vlm_bench",)
"""Reproductions that compare several methods rather than reproduce one paper (``prunelab reproduce <name>``)."""


def reproducible() -> list[str]:
    """Methods that have a reproduction (``prunelab.reproductions.<name>.run``), in table order, then the
    :data:`BENCHES`."""
    import importlib.util

    def has_run(name: str) -> bool:
        try:
            return importlib.util.find_spec(f"prunelab.reproductions.{name}.run") is not None
        except ModuleNotFoundError:  # no reproductions/<name> package at all
            return False

    return [e.name for e in methods() if e.reproduction and has_run(e.reproduction)] + [
        b for b in BENCHES if has_run(b)]
