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
import sys

from prunelab.registry import BACKBONES, METHODS, reproducible


def _list() -> int:
    print("Methods (prunelab.methods.<name>):")
    for m in METHODS:
        print(f"  {m.name:<14} {m.family:<20} {', '.join(m.classes)}")
        print(f"  {'':<14} {m.paper}")
        print(f"  {'':<14} backbones: {', '.join(m.backbones)}; status: {m.status}")
    print("\nBackbone seams:")
    for name, where in BACKBONES.items():
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
        module.add_arguments(rep.add_argument_group(f"{paper} --preset {preset} options"), preset)
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
