"""What a benchmark run leaves behind: results.json (everything, to recompute any number) and report.md."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers

import draftwise
from draftwise.bench.metrics import BASELINE, REFERENCES


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(model_name: str, model, options: dict) -> dict:
    """Enough about the machine and software to know whether two runs can be compared."""
    device = next(model.parameters()).device
    return {
        "draftwise": draftwise.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "model": model_name,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(device),
        "command": sys.argv,
        "options": options,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@dataclass
class BenchRun:
    """One `draftwise bench` run as results.json stores it: where it ran, its settings, the methods asked for (and
    why some could not run), and what each measured."""

    environment: dict
    settings: dict
    methods: list[str]
    unavailable: dict[str, str]
    summary: dict
    records: list[dict]


def write_results(path: Path, run: BenchRun) -> None:
    path.write_text(json.dumps(asdict(run), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def time_split_cells(split: dict | None) -> list[str]:
    if not split:
        return ["–"] * 4
    total = sum(split.values())
    return [
        fmt(100 * split[k] / total if total else None, ".0f", "%")
        for k in ("prefill_s", "draft_s", "verify_s", "overhead_s")
    ]


def speedup_cell(row: dict) -> str:
    """1.15× (1.08–1.22): the speedup and its 95% bootstrap interval over questions, where there is one."""
    interval = row.get("speedup_ci95")
    cell = fmt(row["speedup"], ".2f", "×")
    return f"{cell} ({interval[0]:.2f}–{interval[1]:.2f})" if interval and row["speedup"] is not None else cell


def overall_table(summary: dict, methods: list[str], unavailable: dict[str, str], greedy: bool) -> str:
    header = [
        "method",
        "tok/s",
        "tok/s (mean per q)",
        "speedup (95% CI over questions)",
        "TTFT ms",
        "τ",
        "draft calls/round",
        "verified/round",
        "plain rounds",
        "policy ms/query",
        "prefill",
        "draft",
        "verify",
        "overhead",
        "peak RSS MiB",
    ]
    header += ["identical", "near-tie", "MISMATCH"] if greedy else []
    header += ["errors"]
    rows = []
    for method in methods:
        if method in unavailable:
            rows.append([method, f"**unavailable:** {unavailable[method]}"] + [""] * (len(header) - 2))
            continue
        row = summary["overall"][method]
        ttft_ms = row["ttft_s"] * 1e3 if row["ttft_s"] is not None else None
        cells = [
            method,
            fmt(row["tokens_per_s"], ".1f"),
            fmt(row["tokens_per_s_mean"], ".1f"),
            speedup_cell(row),
            fmt(ttft_ms, ".0f"),
            fmt(row["tau"]),
            fmt(row["draft_calls_per_round"]),
            fmt(row["verified_per_round"], ".1f"),
            fmt(row.get("plain_round_share"), ".0%"),
            fmt(row.get("policy_ms_per_query"), ".3f"),
            *time_split_cells(row["time_split_s"]),
            fmt(row["peak_rss_mb"], ".0f"),
        ]
        if greedy:
            reference = method in REFERENCES
            mismatch = f"**{row['mismatch']}**" if row["mismatch"] else "0"
            cells += ["ref", "", ""] if reference else [str(row["identical"]), str(row["near_tie"]), mismatch]
        rows.append(cells + [str(row["errors"])])
    return table(header, rows)


def category_table(summary: dict, methods: list[str], key: str, spec: str, suffix: str = "") -> str:
    rows = []
    scopes = {**summary["categories"], "**overall**": summary["overall"]}
    for category, rows_by_method in scopes.items():
        count = max((r["questions"] for r in rows_by_method.values()), default=0)
        cells = []
        for m in methods:
            cell, interval = fmt(rows_by_method[m][key], spec, suffix), rows_by_method[m].get(f"{key}_ci95")
            cells.append(f"{cell} ({interval[0]:{spec}}–{interval[1]:{spec}})" if interval else cell)
        rows.append([category, str(count), *cells])
    return table(["category", "n", *methods], rows)


def losslessness_section(records: list[dict], epsilon: float) -> str:
    """Greedy outputs against `ar`: a real mismatch means a method is not lossless, so it heads the report."""
    compared = [r for r in records if r.get("verdict")]
    mismatches = [r for r in compared if r["verdict"] == "mismatch"]
    near_ties = [r for r in compared if r["verdict"] == "near_tie"]
    if mismatches:
        head = (
            f"> [!CAUTION]\n> # ❌ LOSSLESSNESS FAILURE: {len(mismatches)} of {len(compared)} greedy "
            f"outputs differ from plain decoding on their own arithmetic where its top-2 logit margin was ≥ ε = "
            f"{epsilon:g}.\n> A lossless method must reproduce greedy decoding token for token. "
            f"Investigate before using any number below."
        )
    else:
        head = (
            f"✅ Lossless: all {len(compared)} greedy outputs match plain decoding on their own arithmetic "
            f"({len(near_ties)} near-ties below ε = {epsilon:g})."
        )
    details = [
        [
            r["method"],
            r.get("reference", BASELINE),
            str(r["question_id"]),
            r["category"],
            r["verdict"].upper().replace("_", "-"),
            str(r["divergence"]["turn"] + 1),
            str(r["divergence"]["position"]),
            fmt(r["divergence"]["ref_margin"], ".4g"),
        ]
        for r in mismatches + near_ties
    ]
    if details:
        head += (
            "\n\nOutputs that differ (turn and token position of the first difference, the reference's margin "
            "there):\n\n"
        )
        head += table(["method", "reference", "question", "category", "verdict", "turn", "token", "margin"], details)
    return head + cross_engine_section(records)


def cross_engine_section(records: list[dict]) -> str:
    """How plain decoding on other arithmetic (transformers' dense weights, llama.cpp) agrees with `ar`: a
    different arithmetic is a different model, so this is information, not a losslessness check."""
    by_method: dict[str, list[dict]] = {}
    for r in records:
        if r.get("cross_engine"):
            by_method.setdefault(r["method"], []).append(r["cross_engine"])
    if not by_method:
        return ""
    rows = []
    for method, checks in by_method.items():
        firsts = [c["divergence"]["position"] for c in checks if c["divergence"] is not None]
        rows.append(
            [
                method,
                f"{sum(c['verdict'] == 'identical' for c in checks)}/{len(checks)}",
                fmt(min(firsts), "d") if firsts else "",
            ]
        )
    return (
        f"\n\nPlain decoding on another arithmetic against `{BASELINE}` (not a losslessness check: other weights "
        "or activations are another model):\n\n" + table(["reference", "identical to ar", "earliest difference"], rows)
    )


def render_report(run: BenchRun, epsilon: float, plots: list[str]) -> str:
    env, settings, methods, unavailable = run.environment, run.settings, run.methods, run.unavailable
    summary, records = run.summary, run.records
    greedy = settings["temperature"] == 0
    errors = [r for r in records if r["error"]]
    gpu = f", {env['gpu']}" if env["gpu"] else ""
    eos = " (end of text ignored: every question generates them all)" if settings.get("ignore_eos") else ""
    nucleus = f", top-p {settings['top_p']:g}" if settings.get("top_p", 1.0) < 1 else ""
    nucleus += f", top-k {settings['top_k']}" if settings.get("top_k") else ""
    parts = [
        "# draftwise bench",
        f"{env['model']} ({env.get('compute', env['dtype'])} on the {env.get('engine', 'hf')} engine, "
        f"{env['device']}{gpu}) on {env['cpu']}, {env['torch_threads']} "
        f"threads; torch {env['torch']}, transformers {env['transformers']}, draftwise {env['draftwise']}.",
        f"Prompts `{settings['prompts']}`: {settings['questions']} questions, max "
        f"{settings['max_new_tokens']} new tokens{eos}, temperature {settings['temperature']:g}{nucleus}, seed "
        f"{settings['seed']}. Methods alternate per question, after a warm-up. Tokens/s = total new tokens / "
        f"total wall time (Spec-Bench); speedup is against `{BASELINE}` in the same run, with a 95% bootstrap "
        "interval over the questions (how much it depends on which were asked, not on the machine's drift "
        "between runs); τ counts the bonus token.",
        "## Losslessness" if greedy else "## Losslessness\n\nSampling run: outputs are not compared.",
    ]
    if greedy:
        parts.append(losslessness_section(records, epsilon))
    parts += [
        "## Overall",
        "Plain rounds: share of rounds the back-off ran without drafting, verifying the root alone because "
        "speculation was not paying (docs/backoff.md). "
        "Time split: share of the engine's own generation time (prefill, drafting, verification, the rest). "
        "Peers outside the engine report only wall time. Peak RSS is the process high-water mark during a "
        "question (weights included).",
        overall_table(summary, methods, unavailable, greedy),
        "## Speedup by category",
        "With a 95% bootstrap interval over the category's questions.",
        category_table(summary, [m for m in methods if m not in unavailable], "speedup", ".2f", "×"),
        "## Tokens/s by category",
        category_table(summary, [m for m in methods if m not in unavailable], "tokens_per_s", ".1f"),
        "## τ (mean accepted length) by category",
        category_table(summary, [m for m in methods if m not in unavailable], "tau", ".2f"),
        "## Rounds without speculation (back-off) by category",
        category_table(summary, [m for m in methods if m not in unavailable], "plain_round_share", ".0%"),
    ]
    if errors:
        parts += [
            "## Errors",
            table(["method", "question", "error"], [[r["method"], str(r["question_id"]), r["error"]] for r in errors]),
        ]
    if plots:
        parts += ["## Plots", "\n\n".join(f"![{Path(p).stem}]({p})" for p in plots)]
    return "\n\n".join(parts) + "\n"
