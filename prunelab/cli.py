"""The ``prunelab`` command.

    prunelab list                                   methods, families, backbones
    prunelab reproduce zero_tprune                  the tiny reproduction (CPU, offline, minutes)
    prunelab reproduce zero_tprune --preset full --imagenet DIR
    prunelab reproduce zero_tprune --help           the preset's own options
    prunelab reproduce fasa                         FASA on SmolLM2-135M (CPU, offline)
    prunelab calibrate fasa --model smollm2 --out F  a model's FASA calibration file
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from prunelab import registry
from prunelab.common.validate import check_budget, check_int, check_real
from prunelab.registry import reproducible


# -- argument types: a bad value exits with status 2 and a message naming the option (argparse adds the name) --
def _checked(parse: Callable, check: Callable, what: str) -> Callable[[str], object]:
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        try:
            return check(value)
        except ValueError as err:  # "value (a keep ratio): must lie in ..." -> "a keep ratio must lie in ..."
            message = re.sub(r"^value(?: \((.*?)\))?: ", lambda m: f"{m[1]} " if m[1] else "", str(err))
            raise argparse.ArgumentTypeError(message) from None  # argparse puts the option's name in front

    convert.__name__ = what
    return convert


def int_arg(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[low, high]`` (either bound optional)."""
    return _checked(int, lambda v: check_int(v, "value", low=low, high=high), "an integer")


def real_arg(low: float | None = None, high: float | None = None, *, low_open: bool = False,
             high_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a number within the bounds (closed unless ``*_open``); NaN is refused."""
    return _checked(float, lambda v: check_real(v, "value", low=low, high=high, low_open=low_open,
                                                high_open=high_open), "a number")


POSITIVE = int_arg(low=1)
NON_NEGATIVE = int_arg(low=0)
RATIO = real_arg(0.0, 1.0, low_open=True)  # a keep ratio or fraction in (0, 1]
UNIT = real_arg(0.0, 1.0)  # a position or quantile in [0, 1]


def _budget(text: str) -> int | float:
    value = float(text)
    return int(value) if "." not in text and "e" not in text.lower() and value.is_integer() else value


BUDGET = _checked(_budget, lambda v: check_budget(v, "value"), "a token count (64) or a keep ratio (0.25)")
"""An argparse ``type``: ``"64"`` is a token count (int >= 1), ``"0.25"`` or ``"1.0"`` a ratio in (0, 1]."""


def existing(kind: str) -> Callable[[str], str]:
    """An argparse ``type``: a path that exists and is a ``"file"`` or a ``"dir"`` (returned with ``~`` expanded)."""

    def convert(text: str) -> str:
        path = Path(text).expanduser()
        if not (path.is_dir() if kind == "dir" else path.is_file()):
            raise argparse.ArgumentTypeError(f"{text!r} is not an existing {'folder' if kind == 'dir' else 'file'}")
        return str(path)

    convert.__name__ = f"an existing {kind}"
    return convert


def looks_like_path(text: str) -> bool:
    """Whether a model argument names a local path rather than a hub id (``name`` or ``org/name``): it starts with
    ``/``, ``.`` or ``~``, holds a backslash or another OS separator, or has more than one ``/``."""
    seps = {os.sep, os.altsep, "\\"} - {None, "/"}
    return text.startswith(("/", ".", "~")) or any(s in text for s in seps) or text.count("/") > 1


def model_arg(text: str) -> str:
    """An argparse ``type`` for ``--model``: a hub id is passed on; a path-like argument must exist."""
    if looks_like_path(text) and not Path(text).expanduser().exists():
        raise argparse.ArgumentTypeError(f"{text!r} looks like a local path but does not exist (a hub id reads "
                                         "'org/name')")
    return str(Path(text).expanduser()) if text.startswith("~") else text


def _list() -> int:
    print("Methods (prunelab.methods.<package>):")
    for m in registry.methods():
        print(f"  {m.name:<14} {m.family:<20} {m.cls.__module__}.{m.cls.__name__}")
        print(f"  {'':<14} {m.paper}")
        print(f"  {'':<14} backbones: {', '.join(m.backbones)}; baselines: {', '.join(m.baselines)}")
        print(f"  {'':<14} status: {m.status}")
    print("\nBaselines (prunelab.methods.baselines):")
    for b in (e for e in registry.entries() if e.is_baseline):
        print(f"  {b.name:<14} {b.family:<20} {b.cls.__name__}: {b.status}")
    print("\nBackbone seams:")
    for name, where in registry.SEAMS.items():
        print(f"  {name:<14} {where}")
    print("\nReproduce one: prunelab reproduce <name> [--preset tiny|full] [--out DIR]")
    return 0


CALIBRATED = ("fasa",)  # methods with a `prunelab calibrate <paper>` command


def _parser(paper: str | None, preset: str, command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunelab", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="prunelab: faithful, fast, tested reimplementations of token-pruning papers.",
        epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list methods, families and backbones")
    rep = sub.add_parser("reproduce", help="run a paper's reproduction and write its table and plots",
                         description="Run a paper's reproduction. 'tiny' runs offline on a CPU in minutes; "
                                     "'full' is the paper's setting (real weights and data, GPUs).")
    rep.add_argument("paper", choices=reproducible(), help="which paper")
    rep.add_argument("--preset", choices=["tiny", "full"], default="tiny", help="tiny (default) or full")
    rep.add_argument("--out", default=None, help="output folder (default: runs/<paper>/<preset>)")
    if paper is not None and command == "reproduce":
        module = importlib.import_module(f"prunelab.reproductions.{paper}.run")
        try:
            module.add_arguments(rep.add_argument_group(f"{paper} --preset {preset} options"), preset)
        except ValueError as e:  # a preset this paper does not have yet
            rep.error(f"{paper}: {e}")
    cal = sub.add_parser("calibrate", help="compute a method's per-model calibration file",
                         description="Compute and save a method's per-model calibration (FASA: chunk agreement).")
    cal.add_argument("paper", choices=CALIBRATED, help="which method")
    if paper in CALIBRATED and command == "calibrate":
        importlib.import_module(f"prunelab.reproductions.{paper}.calibrate").add_arguments(cal)
    return parser


def _peek(argv: list[str]) -> tuple[str | None, str, str | None]:
    """The paper, preset and command named on the command line, so their own options can be added."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("command", nargs="?")
    peek.add_argument("paper", nargs="?")
    peek.add_argument("--preset", default="tiny")
    known, _ = peek.parse_known_args(argv)
    names = set(reproducible())
    if known.command == "calibrate" and known.paper in CALIBRATED:
        return known.paper, "tiny", "calibrate"
    ok = known.command == "reproduce" and known.paper in names and known.preset in ("tiny", "full")
    return (known.paper, known.preset, "reproduce") if ok else (None, "tiny", None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser(*_peek(argv)).parse_args(argv)
    if args.command == "list":
        return _list()
    if args.command == "calibrate":
        importlib.import_module(f"prunelab.reproductions.{args.paper}.calibrate").main(args)
        return 0
    importlib.import_module(f"prunelab.reproductions.{args.paper}.run").main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
