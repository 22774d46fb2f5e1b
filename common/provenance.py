"""Provenance of a result: commit, hardware, date, library versions; and writing results as JSON + Markdown."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import torch

LIBRARIES = ("torch", "timm", "transformers", "triton", "accelerate", "numpy")


def git_commit(cwd: str | Path | None = None) -> str:
    """The commit of the checkout holding prunelab, with ``-dirty`` if it has uncommitted changes."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def hardware() -> str:
    """CPU model and core count, plus the GPU when one is used."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    if torch.cuda.is_available():
        desc += f"; GPU {torch.cuda.get_device_name(0)}"
    return desc


def provenance(**extra) -> dict:
    """Everything a reader needs to know where a number came from."""
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = "not installed"
    return {
        "commit": git_commit(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "hardware": hardware(),
        "python": platform.python_version(),
        "versions": versions,
        **extra,
    }


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of ``rows``; floats with 3 significant decimals."""
    columns = list(columns or rows[0].keys())

    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir: str | Path, name: str, rows: Sequence[dict], meta: dict,
                  columns: Sequence[str] | None = None, title: str = "") -> tuple[Path, Path]:
    """Write ``<name>.json`` (rows + provenance) and ``<name>.md`` (table + provenance) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps({"provenance": meta, "rows": list(rows)}, indent=2) + "\n")
    versions = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    md = [f"# {title or name}", "", markdown_table(rows, columns), "",
          f"- commit: `{meta.get('commit')}`", f"- date (UTC): {meta.get('date_utc')}",
          f"- hardware: {meta.get('hardware')}", f"- python {meta.get('python')}; {versions}"]
    md += [f"- {k}: {v}" for k, v in meta.items() if k not in ("commit", "date_utc", "hardware", "python", "versions")]
    md_path.write_text("\n".join(md) + "\n")
    return json_path, md_path
