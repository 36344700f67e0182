"""Where one decode step's time goes: transformers (fp32, bf16) against llama.cpp on the same GGUF.

For each path: the median time of a 1-token forward at a given context, the torch profiler's split by operator
(matmuls, attention, everything else; the remainder of the wall time is Python and framework overhead), the
weight bytes a token has to read, and the floor those bytes set at this machine's measured memory bandwidth.

    python benchmarks/forward_breakdown.py --context 256 --out benchmarks/runs/forward-breakdown.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from draftwise.models import load_model, model_gguf
from draftwise.target import TargetModel
from draftwise.tree import DraftTree

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm")
ATTENTION_OPS = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu")


def memory_bandwidth_gbs(size_mb: int = 1024, repeats: int = 5) -> float:
    """Read bandwidth: the best of a few sums over a buffer far larger than the caches."""
    buffer = torch.ones(size_mb * 2**20 // 4)
    best = min(_timed(lambda: buffer.sum()) for _ in range(repeats))
    return buffer.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def hf_breakdown(dtype: str, context: int, steps: int) -> dict:
    model, _ = load_model("smollm2-135m", dtype=dtype)
    target = TargetModel(model)
    target.prefill(torch.arange(100, 100 + context))
    past = target.length

    def step() -> None:
        target.forward_tree(DraftTree.root_only(7))
        target.truncate(past)

    for _ in range(3):
        step()
    times = [_timed(step) for _ in range(steps)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        profiled_s = sum(_timed(step) for _ in range(steps))
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    matmul_us = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    attention_us = sum(e.self_cpu_time_total for e in events if e.key in ATTENTION_OPS)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    wall = statistics.median(times)
    per_step = 1e-6 / steps
    return {
        "path": f"transformers {dtype}",
        "step_ms": wall * 1e3,
        "profiled_step_ms": profiled_s / steps * 1e3,  # the split below is of this (profiling slows it)
        "matmul_ms": matmul_us * per_step * 1e3,
        "attention_ms": attention_us * per_step * 1e3,
        "other_ops_ms": (total_us - matmul_us - attention_us) * per_step * 1e3,
        "python_and_framework_ms": (profiled_s / steps - total_us * per_step) * 1e3,
        "weight_bytes_per_token": weight_bytes,
        "top_ops": [
            (e.key, round(e.self_cpu_time_total * per_step * 1e3, 3))
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
        ],
    }


def llama_breakdown(context: int, steps: int) -> dict:
    from draftwise.engine import llama_parts

    _, target = llama_parts("smollm2-135m")
    target.prefill(torch.arange(100, 100 + context))
    past = target.length

    def step() -> None:
        target.forward_tree(DraftTree.root_only(7))
        target.truncate(past)

    for _ in range(3):
        step()
    times = [_timed(step) for _ in range(steps)]
    costs = {n: target.verify_cost(n) * 1e3 for n in (1, 2, 4, 8, 16)}
    return {
        "path": "llama.cpp (GGUF Q4_1 weights, Q8 activations)",
        "step_ms": statistics.median(times) * 1e3,
        "weight_bytes_per_token": model_gguf("smollm2-135m").stat().st_size,
        "calibrated_verify_ms_by_nodes": costs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/runs/forward-breakdown.json"))
    args = parser.parse_args()
    bandwidth = memory_bandwidth_gbs()
    rows = [hf_breakdown("fp32", args.context, args.steps), hf_breakdown("bf16", args.context, args.steps)]
    try:
        rows.append(llama_breakdown(args.context, args.steps))
    except Exception as exc:  # llama-cpp-python not installed
        print(f"llama.cpp skipped: {exc}")
    for row in rows:
        row["bandwidth_floor_ms"] = row["weight_bytes_per_token"] / (bandwidth * 1e9) * 1e3
        print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "threads": torch.get_num_threads(),
                "context": args.context,
                "memory_bandwidth_gbs": bandwidth,
                "paths": rows,
            },
            indent=2,
        )
    )
    print(f"memory bandwidth {bandwidth:.1f} GB/s; wrote {args.out}")


if __name__ == "__main__":
    main()
