"""Reproduction entry points, one sub-package per paper, run by ``prunelab reproduce <paper>``."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import ModuleType


def preset_dispatch(presets: dict[str, ModuleType]):
    """``(add_arguments, main)`` for a paper's ``run`` module, given its preset modules.

    Each preset module exposes ``add_arguments(parser)``, ``run(args, out)`` and ``default_out()``.
    """

    def add_arguments(parser: argparse.ArgumentParser, preset: str) -> None:
        if preset not in presets:
            raise ValueError(f"preset: this reproduction has the presets {sorted(presets)}, not {preset!r}")
        presets[preset].add_arguments(parser)

    def main(args: argparse.Namespace) -> dict:
        module = presets[args.preset]
        return module.run(args, Path(args.out) if args.out else module.default_out())

    return add_arguments, main
