"""Load hustvl/Vim checkpoints into :class:`~prunelab.methods.top_vim.vim.VisionMamba`.

Paper: Zhan et al., "Exploring Token Pruning in Vision State Space Models", NeurIPS 2024 (arXiv 2409.18962), which
fine-tunes from the released Vim-T/S checkpoints. Compared against hustvl/Vim at commit dd0358a: ``vim/main.py`` saves
``{"model": state_dict, "optimizer": ..., "args": argparse.Namespace, ...}``; ``VisionMamba`` uses the same parameter
names (``layers.{i}.mixer.A_b_log``, ``norm_f.weight``, ``cls_token``, ...), so a checkpoint loads strictly by name.

What differs: the file is read with ``torch.load(weights_only=True)`` (``argparse.Namespace`` is the one class
allowed besides tensors and containers, for the saved ``args``), and there is no position-embedding interpolation for
other image sizes (hustvl's ``--finetune`` path does bicubic interpolation; here a shape mismatch is an error).

PlainMamba (ChenhongyiYang/PlainMamba at 0975a1d): mmcv saves ``{"meta": ..., "state_dict": ...}`` with mmcls's
``ImageClassifier`` names; ``backbone.`` is dropped and ``head.fc.`` becomes ``head.``, the rest (``layers.{i}.mamba.
direction_Bs``, ``ln1.weight``, ``patch_embed.stem.1.running_mean``, ...) are :class:`PlainMamba`'s own names.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

import torch

from prunelab.methods.top_vim.plain_mamba import PlainMamba
from prunelab.methods.top_vim.vim import VisionMamba


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def read_vim_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state dict of a hustvl checkpoint file: ``ckpt["model"]``, or the file itself if it is one."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj["model"] if isinstance(obj, Mapping) and "model" in obj else obj
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"path: {os.fspath(path)!r} holds neither a state dict nor a dict with one under 'model'")
    return dict(state)


def _load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path, what: str) -> None:
    """``load_state_dict(strict=True)`` with one error naming the missing, unexpected and wrongly shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        problems = [f"{label} ({len(keys)}): {_listing(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]
        raise ValueError(f"path: {os.fspath(path)!r} does not fit this {what}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def load_vim_checkpoint(model: VisionMamba, path: str | os.PathLike) -> VisionMamba:
    """Load a hustvl Vim checkpoint strictly into ``model`` (in place); returns ``model``.

    Args:
        model: a :class:`VisionMamba` whose config matches the checkpoint's (e.g. :func:`vim_tiny` for Vim-T).
        path: a ``.pth`` file with the state dict under ``"model"`` (as hustvl's ``main.py`` saves it) or a bare one.

    Raises:
        ValueError: naming the missing, unexpected and wrongly shaped keys, when the checkpoint does not fit.
    """
    _load_strict(model, read_vim_state_dict(path), path,
                 f"VisionMamba ({model.cfg.embed_dim}-d, depth {model.cfg.depth})")
    return model


def read_plain_mamba_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state dict of a PlainMamba checkpoint (mmcv's ``{"state_dict": ..., "meta": ...}``, the fine-tuning
    script's ``{"model": ...}`` or a bare one),
    renamed from mmcls's ``ImageClassifier`` (``backbone.*``, ``head.fc.*``) to :class:`PlainMamba`'s names."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj
    for key in ("state_dict", "model"):  # mmcv's checkpoints; the fine-tuning script's
        if isinstance(obj, Mapping) and key in obj:
            state = obj[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"path: {os.fspath(path)!r} holds neither a state dict nor a dict with one under "
                         "'state_dict' or 'model'")
    renamed = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("backbone."):
            key = key.removeprefix("backbone.")
        elif key.startswith("head.fc."):
            key = "head." + key.removeprefix("head.fc.")
        renamed[key] = value
    return renamed


def load_plain_mamba_checkpoint(model: PlainMamba, path: str | os.PathLike) -> PlainMamba:
    """Load a released PlainMamba checkpoint (ChenhongyiYang/PlainMamba ``l1.pth`` / ``l2.pth`` / ``l3.pth``)
    strictly into ``model`` (in place); returns ``model``. Errors as :func:`load_vim_checkpoint`."""
    _load_strict(model, read_plain_mamba_state_dict(path), path,
                 f"PlainMamba ({model.cfg.embed_dim}-d, depth {model.cfg.depth})")
    return model
