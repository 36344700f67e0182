"""The lean engine's `--dtype auto` compute (draftwise's own grid kernel: `float32+w4a8` on AVX-512 VNNI,
`float32+int4` on AVX2) against `bfloat16+int4` (PyTorch's int4 kernel), same GGUF weights, in one process.
Where the target runs whole decoder layers in one C++ call (csrc/avx512.cpp), the same compute with that call
switched off (one PyTorch op at a time around the same kernels, "per-op") runs too.

1. Verify cost: one target forward over N tree nodes at a 300-token context, median of 7, both targets.
2. Plain and prompt-lookup decoding on MT-bench first turns, alternating the two computes per question after a
   warm-up; tokens/s ratio and whether each compute's `pld` equals its own `ar` token for token.

    python benchmarks/grid_kernel.py --questions 5 --max-new-tokens 128 --out benchmarks/runs/grid-kernel.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import draftwise
import draftwise.core.kernels
from draftwise.bench.datasets import load_questions
from draftwise.core.machine import cpu_flags


def verify_ms(target, nodes: int, context: int = 300) -> float:
    target.prefill(torch.arange(context) % 1000 + 100)
    tokens, positions = torch.arange(nodes) + 5, torch.arange(context, context + nodes)[None]
    mask = torch.ones(nodes, context + nodes, dtype=torch.bool).tril(context)[None, None]
    times = []
    for _ in range(7):
        start = time.perf_counter()
        target.forward(tokens, positions, mask)
        times.append(time.perf_counter() - start)
        target.truncate(context)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/runs/grid-kernel.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    engines = {}
    for dtype in ("auto", "bf16"):
        engine = draftwise.load("smollm2-135m", method="ar", dtype=dtype)
        engines[engine.dtype_name] = engine
    assert len(engines) == 2, f"--dtype auto runs {next(iter(engines))} here: no grid kernel to compare"
    fused = next(iter(engines.values()))
    if getattr(fused.target, "kernel", None) is not None:
        per_op = draftwise.load("smollm2-135m", method="ar", dtype="auto")
        per_op.target.kernel = None
        per_op.target.calibrate()  # pld sizes its trees by the cost measured at load: re-measure
        engines[f"{per_op.dtype_name} per-op"] = per_op
    sizes = (1, 2, 4, 8, 16, 32)
    verify = {name: {n: round(verify_ms(e.target, n), 2) for n in sizes} for name, e in engines.items()}
    questions = load_questions("mt-bench", limit=args.questions, first_turn_only=True)
    runs = [(name, method) for name in engines for method in ("ar", "pld")]
    for name, method in runs:  # warm-up
        engines[name].generate("Hello", method=method, max_new_tokens=8)
    records = []
    for index, question in enumerate(questions):
        order = runs[index % len(runs) :] + runs[: index % len(runs)]
        for name, method in order:
            start = time.perf_counter()
            out = engines[name].generate(question.turns[0], method=method, max_new_tokens=args.max_new_tokens)
            seconds = time.perf_counter() - start
            records.append(
                {
                    "question": question.question_id,
                    "compute": name,
                    "method": method,
                    "tokens": len(out.token_ids),
                    "rounds": out.stats.rounds,
                    "verified": out.stats.verified_tokens,
                    "verify_s": out.stats.verify_s,
                    "draft_s": out.stats.draft_s,
                    "seconds": seconds,
                    "token_ids": out.token_ids,
                }
            )
    summary = {}
    for name, method in runs:
        mine = [r for r in records if r["compute"] == name and r["method"] == method]
        summary[f"{method}@{name}"] = round(sum(r["tokens"] for r in mine) / sum(r["seconds"] for r in mine), 2)
    identical = {
        name: sum(
            a["token_ids"] == b["token_ids"]
            for a in records
            if a["compute"] == name and a["method"] == "pld"
            for b in records
            if b["compute"] == name and b["method"] == "ar" and b["question"] == a["question"]
        )
        for name in engines
    }
    report = {
        "verify_ms_by_nodes": verify,
        "tokens_per_s": summary,
        "pld_identical_to_ar": identical,
        "questions": len(questions),
        "max_new_tokens": args.max_new_tokens,
        "cpu": sorted({"avx2", "avx512_bf16", "avx512_vnni"} & cpu_flags()),
    }
    print(json.dumps(report, indent=1))
    args.out.write_text(json.dumps({**report, "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
