"""``prunelab reproduce fasa --preset tiny|full``: dispatch to the preset's module."""

from __future__ import annotations

import argparse
from pathlib import Path

from prunelab.reproductions.fasa import full, tiny

PRESETS = {"tiny": tiny, "full": full}


def add_arguments(parser: argparse.ArgumentParser, preset: str) -> None:
    PRESETS[preset].add_arguments(parser)


def main(args: argparse.Namespace) -> dict:
    module = PRESETS[args.preset]
    out = Path(args.out) if args.out else module.default_out()
    return module.run(args, out)
