"""The shared ``full`` preset of the VLM pruning papers: the paper's models and benchmarks through lmms-eval.

For each method and budget it runs lmms-eval's ``simple_evaluate`` with the model ``prunelab``
(:mod:`prunelab.reproductions.lmms_model`) on a LLaVA-1.5, LLaVA-NeXT or Qwen2.5-VL checkpoint, collects every
task's metrics into ``full.{json,md}`` (with provenance), keeps lmms-eval's own result files under ``lmms/``,
and plots each task's first metric against the budget. It needs the ``eval`` extra (``pip install -e .[eval]``),
the checkpoint and the task data (lmms-eval downloads them from the hub), and in practice a GPU.

Offline, the same path runs on a tiny folder and the synthetic task of :mod:`.vlm_offline`::

    prunelab reproduce divprune --preset full --model DIR --tasks prunelab_shapes --include-path TASKDIR
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib.pyplot as plt

from prunelab.cli import BUDGET, NON_NEGATIVE, POSITIVE, existing
from prunelab.common.provenance import provenance, write_results
from prunelab.reproductions.vlm_eval import METHODS

__all__ = ["budgets_by_model", "full_preset", "parse_budget", "parse_method_args"]


def budgets_by_model(table) -> Callable[[str], list]:
    """A paper's budgets for a checkpoint name, from ``table`` keyed ``"llava-1.5"``, ``"llava-next"``,
    ``"qwen2_5_vl"``: NeXT (``next`` or ``v1.6`` in the name) and Qwen (``qwen``) by name, LLaVA-1.5 otherwise."""

    def budgets(model: str) -> list:
        low = model.lower()
        key = "qwen2_5_vl" if "qwen" in low else "llava-next" if ("next" in low or "v1.6" in low) else "llava-1.5"
        return list(table[key])

    return budgets


def parse_budget(text: str) -> int | float:
    """``"64"`` -> 64 tokens per image; ``"0.098"`` -> keep ratio 0.098 (``"1.0"`` stays a ratio); a count below 1
    or a ratio outside (0, 1] is an ``ArgumentTypeError``."""
    return BUDGET(text)


def _key_value(item: str) -> str:
    key, sep, _ = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
    return item


def parse_method_args(items: Sequence[str]) -> dict:
    """``["official_quirks=true", "anchor_ratio=0.2"]`` -> method fields, typed as lmms-eval types model_args."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"method-args: expected KEY=VALUE, got {item!r}")
        low = value.lower()
        out[key] = (True if low == "true" else False if low == "false" else int(value) if value.isdigit()
                    else _float_or_str(value))
    return out


def _float_or_str(value: str):
    try:
        return float(value)
    except ValueError:
        return value


def _metrics(results: dict) -> list[tuple[str, str, float]]:
    """(task, metric, value) of lmms-eval's ``results`` dict: numeric metrics, stderr columns dropped."""
    out = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            name = key.split(",")[0]
            if key == "alias" or "stderr" in name or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            out.append((task, name, float(value)))
    return out


def _plot(rows: Sequence[dict], path: Path) -> None:
    """Each task's first metric against the budget, one line per method, dense dashed."""
    tasks = list(dict.fromkeys((r["task"], r["metric"]) for r in rows))
    firsts = [t for i, t in enumerate(tasks) if all(t[0] != u[0] for u in tasks[:i])]
    fig, axes = plt.subplots(1, len(firsts), figsize=(4 * len(firsts), 3.2), squeeze=False)
    for ax, (task, metric) in zip(axes[0], firsts):
        sub = [r for r in rows if r["task"] == task and r["metric"] == metric]
        for method in dict.fromkeys(r["method"] for r in sub if r["method"] != "dense"):
            pts = sorted((r["budget"], r["value"]) for r in sub if r["method"] == method)
            ax.plot(*zip(*pts), marker="o", label=method)
        for r in sub:
            if r["method"] == "dense":
                ax.axhline(r["value"], color="k", ls="--", lw=1, label="dense")
        ax.set_xlabel("budget per image (tokens, or keep ratio)")
        ax.set_ylabel(metric)
        ax.set_title(task, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def full_preset(name: str, paper: str, *, default_model: str, tasks: Sequence[str], methods: Sequence[str],
                budgets: Callable[[str], Sequence[int | float]], notes: str = "",
                budget_args: Callable[[str, int | float], dict] | None = None, shots: int = 0):
    """``(add_arguments, run, default_out)`` of a paper's full preset module.

    Args:
        name: the reproduction's name (output folder ``runs/<name>/full``).
        paper: the paper's name, for titles.
        default_model: the checkpoint the preset runs without ``--model``.
        tasks: default lmms-eval task names.
        methods: default methods (``dense`` first), from :data:`~prunelab.reproductions.vlm_eval.METHODS`.
        budgets: the paper's budgets for a model id (used without ``--budgets``).
        notes: recorded in the provenance (e.g. where the paper's settings come from).
        budget_args: ``(method, budget) -> method fields`` for one budget (default ``{"budget": budget}``), for
            methods whose amount is another field (CATP's removed share ``ratio``).
        shots: in-context demonstrations per question by default (``--shots``; the lmms-eval model's ``shots``).
    """
    budget_args = budget_args or (lambda _method, budget: {"budget": budget})

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", default=default_model,
                            help="hub id or local folder of a LLaVA-1.5, LLaVA-NeXT or Qwen2.5-VL checkpoint")
        parser.add_argument("--revision", default=None, help="hub revision (commit) of the model")
        parser.add_argument("--tasks", nargs="+", default=list(tasks), help="lmms-eval task names")
        parser.add_argument("--include-path", type=existing("dir"), default=None,
                            help="folder of extra lmms-eval task YAMLs")
        parser.add_argument("--budgets", type=parse_budget, nargs="+", default=None,
                            help="token counts (64) or keep ratios (0.098) per image; default: the paper's")
        parser.add_argument("--methods", nargs="+", default=list(methods), choices=METHODS)
        parser.add_argument("--method-args", type=_key_value, nargs="*", default=[], metavar="KEY=VALUE",
                            help=f"fields of the {paper} method object (not of the baselines), e.g. "
                                 "official_quirks=true")
        parser.add_argument("--shots", type=NON_NEGATIVE, default=shots,
                            help="in-context demonstrations (image, question, answer) before each question")
        parser.add_argument("--shot-seed", type=int, default=0, help="seed of the demonstrations' draw")
        parser.add_argument("--shot-split", default=None,
                            help="split the demonstrations come from (default: the task's training or few-shot "
                                 "split when its data hold one, else the evaluated split without the question)")
        parser.add_argument("--shot-answer", default=None,
                            help="document field of a demonstration's answer (default: the task's doc_to_target)")
        parser.add_argument("--limit", type=POSITIVE, default=None, help="samples per task (default: all)")
        parser.add_argument("--batch-size", type=POSITIVE, default=1, help="lmms-eval batch size (papers: 1)")
        parser.add_argument("--dtype", default="float16", choices=["auto", "bfloat16", "float16", "float32"])
        parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")

    def run(args: argparse.Namespace, out: Path) -> dict:
        try:
            from lmms_eval.evaluator import simple_evaluate
            from lmms_eval.tasks import TaskManager
        except ImportError as e:
            raise RuntimeError(f"{name} --preset full needs lmms-eval: pip install -e '.[eval]' ({e})") from e
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"limit: expected >= 1, got {args.limit}")
        method_args = parse_method_args(args.method_args)
        plan = [(m, b) for m in args.methods for b in ([None] if m == "dense" else args.budgets or budgets(args.model))]
        manager = TaskManager(include_path=args.include_path)
        out = Path(out)
        (out / "lmms").mkdir(parents=True, exist_ok=True)
        rows = []
        for method, budget in plan:
            margs = {"pretrained": args.model, "method": method, "dtype": args.dtype}
            if args.revision:
                margs["revision"] = args.revision
            if method != "dense":
                margs.update(method_args if method == name else {}, **budget_args(method, budget))
            if args.shots:
                margs.update(shots=args.shots, shot_seed=args.shot_seed,
                             **{k: v for k, v in (("shot_split", args.shot_split), ("shot_answer", args.shot_answer))
                                if v is not None})
            print(f"{paper} full: {method} budget={budget} on {args.model}: {', '.join(args.tasks)}", flush=True)
            arg_string = ",".join(f"{k}={v}" for k, v in margs.items())
            res = simple_evaluate(model="prunelab", model_args=arg_string, tasks=list(args.tasks),
                                  batch_size=args.batch_size, limit=args.limit, device=args.device,
                                  task_manager=manager, log_samples=False)
            tag = method if budget is None else f"{method}_{budget}"
            (out / "lmms" / f"{tag}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
            rows += [{"method": method, "budget": "all" if budget is None else budget, "task": task,
                      "metric": metric, "value": value} for task, metric, value in _metrics(res["results"])]
        meta = provenance(preset="full", paper=paper, model=args.model, revision=args.revision or "default",
                          dtype=args.dtype, batch_size=args.batch_size, limit=args.limit or "all",
                          method_args=method_args or "paper defaults", evaluator="lmms-eval (model 'prunelab')",
                          shots=(f"{args.shots} demonstrations per question, seed {args.shot_seed}, from "
                                 f"{args.shot_split or 'the training split if the task has one, else the evaluated'}"
                                 if args.shots else 0),
                          **({"notes": notes} if notes else {}))
        write_results(out, "full", rows, meta, ["method", "budget", "task", "metric", "value"],
                      f"{paper} full: lmms-eval on {args.model}")
        if rows:
            _plot(rows, out / "full.png")
        print(f"{paper} full: tables in {out}")
        return {"rows": rows}

    return add_arguments, run, lambda: Path(f"runs/{name}/full")
