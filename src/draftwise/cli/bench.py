"""`draftwise bench`: every method on the same prompts, model and settings, measured as Spec-Bench does
(draftwise.bench holds the prompt sets, the runners, the metrics and the report)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from draftwise.bench import datasets, metrics, plots, report, runner
from draftwise.cli.common import add_model_arg, add_sampling_args
from draftwise.core.errors import DraftwiseError
from draftwise.engine import check_sampling
from draftwise.targets.load import load_target

DEFAULT_METHODS = "ar,pld,hf,hf-pld"
QUICK_LIMIT, QUICK_MAX_NEW_TOKENS = 2, 24
FULL_MAX_NEW_TOKENS = 256


def register(commands) -> None:
    bench = commands.add_parser(
        "bench",
        help="benchmark methods on a prompt set (tokens/s, speedup, τ, losslessness)",
        description="Run several methods on the same prompts, alternating per prompt after a warm-up, and "
        "write results.json, report.md and plots to --out.",
    )
    add_model_arg(bench)
    bench.add_argument("--dtype", default="auto", help="auto | bf16 | fp32 | fp16")
    bench.add_argument("--device", default="cpu", help="cpu or cuda")
    bench.add_argument(
        "--engine", default="auto", help="auto | lean | hf: who runs the target for draftwise methods (default: auto)"
    )
    bench.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma-separated, or 'all': draftwise methods and peers (hf, hf-pld, llama.cpp, "
        f"llama.cpp-pld); METHOD@llama or METHOD@hf runs a method on another engine; METHOD~TAG is a "
        f"second configuration of METHOD with its own --method-option METHOD~TAG.KEY=VALUE; "
        f"`ar` is always run as the baseline (default: {DEFAULT_METHODS})",
    )
    bench.add_argument("--draft-model", default=None, help="draft model for the draft-model method")
    bench.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="a drafter option, e.g. pld.total_tokens=32 (repeatable)",
    )
    bench.add_argument(
        "--prompts",
        default="spec-bench",
        help="spec-bench | mt-bench | humaneval | gsm | FILE.jsonl in Spec-Bench format "
        "(question_id, category, turns) (default: spec-bench)",
    )
    bench.add_argument("--categories", default=None, help="comma-separated categories to keep")
    bench.add_argument("--first-turn-only", action="store_true", help="ask only each question's first turn")
    bench.add_argument(
        "--limit", type=int, default=None, help="at most this many questions, taken round-robin across categories"
    )
    add_sampling_args(bench)
    bench.set_defaults(max_new_tokens=None, seed=0)
    bench.add_argument(
        "--ignore-eos",
        action="store_true",
        help="generate --max-new-tokens on every question whatever the model says, so that every method times "
        "the same number of tokens (sampled outputs otherwise end at different lengths, and a short one weighs "
        "its prefill more)",
    )
    bench.add_argument(
        "--tie-epsilon",
        type=float,
        default=None,
        help="greedy outputs that part from ar where ar's top-2 logit margin is below this "
        "are near-ties, not mismatches (default: 1e-3 in fp32, 0.5 in bf16/fp16)",
    )
    bench.add_argument(
        "--profile",
        type=Path,
        default=None,
        help='cost profile JSON {"verify_ms": {"<tree size>": ms}} to plot the verify cost',
    )
    bench.add_argument("--out", type=Path, default=Path("runs/bench"), help="output directory (default: runs/bench)")
    bench.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke check: {QUICK_LIMIT} questions, {QUICK_MAX_NEW_TOKENS} new tokens unless given otherwise",
    )
    bench.set_defaults(func=run)


def parse_methods(spec: str) -> list[str]:
    """Method names in order, `ar` first when not given (speedups and the losslessness check need it)."""
    known = runner.known_methods()
    given = [n.strip() for n in spec.split(",") if n.strip()]
    names = known if spec.strip() == "all" else list(dict.fromkeys(given))
    unknown = [n for n in names if n.partition("~")[0] not in known]
    if unknown:
        raise DraftwiseError(f"unknown methods {', '.join(unknown)}; choose from {', '.join(known)} or 'all'")
    names = names if "ar" in names else ["ar", *names]
    # each greedy method is checked against plain decoding on its own arithmetic: run that reference too
    for name in list(names):
        wanted = metrics.reference_candidates(name)
        if wanted and not any(w in names for w in wanted):
            names.insert(1, wanted[0])
    return names


def parse_method_options(items: list[str], draft_model: str | None) -> dict[str, dict]:
    """`METHOD.KEY=VALUE` strings to per-method keyword options; values are JSON where they parse."""
    options: dict[str, dict] = {"draft-model": {"draft_model": draft_model}} if draft_model else {}
    for item in items:
        target, sep, raw = item.partition("=")
        method, dot, key = target.partition(".")
        if not (sep and dot and method and key):
            raise DraftwiseError(f"--method-option '{item}': expected METHOD.KEY=VALUE, e.g. pld.total_tokens=32")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        options.setdefault(method, {})[key] = value
    return options


def run(args: argparse.Namespace) -> int:
    limit = args.limit if args.limit is not None else (QUICK_LIMIT if args.quick else None)
    max_new_tokens = args.max_new_tokens or (QUICK_MAX_NEW_TOKENS if args.quick else FULL_MAX_NEW_TOKENS)
    sampling = check_sampling(max_new_tokens, args.temperature, args.top_p, args.top_k)  # before the slow load
    if limit is not None and limit < 1:
        raise DraftwiseError(f"--limit must be >= 1, got {limit}")
    names = parse_methods(args.methods)
    options = parse_method_options(args.method_option, args.draft_model)
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    questions = datasets.load_questions(args.prompts, categories, limit, args.first_turn_only)
    profile = plots.load_profile(args.profile) if args.profile else None
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DraftwiseError(f"cannot create --out {args.out}: {exc}") from exc

    if args.engine == "llama":
        raise DraftwiseError("bench runs llama.cpp per method: name them METHOD@llama, or the peer llama.cpp")
    model, tokenizer, target = load_target(args.model, args.engine, args.dtype, args.device)
    settings = runner.Settings(max_new_tokens, sampling.temperature, args.top_p, args.top_k, args.ignore_eos)
    runners, unavailable = runner.build_runners(names, model, tokenizer, args.model, options, target)
    print(f"[draftwise] warming up {', '.join(runners)}", file=sys.stderr, flush=True)
    unavailable.update(runner.warm_up(runners, settings, args.seed))
    runners = {n: r for n, r in runners.items() if n not in unavailable}
    for name, reason in unavailable.items():
        print(f"[draftwise] {name} cannot run: {reason}", file=sys.stderr)
    if not runners:
        raise DraftwiseError("no method could run")

    with progress_bar(len(questions) * len(runners)) as on_record:
        records = runner.run_benchmark(runners, questions, settings, args.seed, on_record)

    available = list(runners)
    dtype = str(model.dtype).removeprefix("torch.")
    epsilon = args.tie_epsilon if args.tie_epsilon is not None else metrics.tie_epsilon(dtype)
    if settings.temperature == 0:
        metrics.assign_verdicts(records, epsilon)
    summary = metrics.aggregate(records, available)
    given = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}
    env = report.environment(args.model, model, given) | {"engine": target.backend, "compute": target.compute.name}
    run_settings = {
        "prompts": args.prompts,
        "categories": categories,
        "questions": len(questions),
        "max_new_tokens": max_new_tokens,
        "temperature": settings.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "ignore_eos": args.ignore_eos,
        "seed": args.seed,
        "tie_epsilon": epsilon,
        "options": options,
    }
    results = report.BenchRun(env, run_settings, names, unavailable, summary, records)
    report.write_results(args.out / "results.json", results)
    plot_files = plots.write_plots(args.out, summary, records, available, profile)
    text = report.render_report(results, epsilon, plot_files)
    (args.out / "report.md").write_text(text, encoding="utf-8")

    print(report.overall_table(summary, names, unavailable, settings.temperature == 0))
    print(f"\n[draftwise] wrote {args.out / 'report.md'}, results.json and {len(plot_files)} plots", file=sys.stderr)
    mismatches = sum(row["mismatch"] for row in summary["overall"].values())
    if mismatches:
        print(
            f"\n\033[1;31m!!! LOSSLESSNESS FAILURE: {mismatches} greedy outputs differ from plain decoding on "
            f"their own arithmetic beyond near-ties (ε = {epsilon:g}); see {args.out / 'report.md'} !!!\033[0m",
            file=sys.stderr,
        )
        return 1
    return 0


@contextmanager
def progress_bar(total: int) -> Iterator[Callable[[dict], None]]:
    """A rich progress bar over (question, method) runs with a running tokens/s per method; yields the
    callback the runner calls after each record."""
    totals: dict[str, tuple[int, float]] = {}
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[speed]}"),
    ]
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task("bench", total=total, speed="")

        def on_record(record: dict) -> None:
            tokens, seconds = totals.get(record["method"], (0, 0.0))
            totals[record["method"]] = (
                tokens + sum(t["new_tokens"] for t in record["turns"]),
                seconds + sum(t["wall_s"] for t in record["turns"]),
            )
            speed = " · ".join(f"{m} {n / s:.1f}" for m, (n, s) in totals.items() if s > 0)
            progress.update(task, advance=1, description=f"q {record['question_id']}", speed=f"{speed} tok/s")

        yield on_record
