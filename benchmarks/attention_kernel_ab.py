"""The tree attention kernel before and after it took every row of a KV head at once, in one process.

    python benchmarks/attention_kernel_ab.py [--before 783d96d]

Builds csrc/avx512.cpp as it was at `--before` under another name, then times one layer's attention (9 query
heads, 3 KV heads, head_dim 64: the default model's) at several contexts and tree sizes, the two kernels' calls
alternating, and checks that they give the same bits.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from draftwise.kernels import avx512_kernel

sys.path.insert(0, str(Path(__file__).parent))
from kernel_ab import build_at  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default="783d96d", help="commit whose attention kernel is the baseline")
    parser.add_argument("--repeats", type=int, default=41)
    args = parser.parse_args()
    before = build_at(args.before)
    after = avx512_kernel()
    torch.manual_seed(0)
    print("| context | rows | before µs | after µs | ratio |\n|---|---|---|---|---|")
    for length in (128, 600, 1500):
        for n in (1, 2, 4, 8):
            q, cache = torch.randn(n, 9, 64), torch.randn(2, 3, 2048, 64)
            visible = torch.ones(n, length, dtype=torch.bool)
            times: dict[str, list[float]] = {"before": [], "after": []}
            for _ in range(args.repeats):
                for name, kernel in (("before", before), ("after", after)):
                    start = time.perf_counter()
                    kernel.attention(q, cache[0], cache[1], length, visible)
                    times[name].append(time.perf_counter() - start)
            same = torch.equal(*(k.attention(q, cache[0], cache[1], length, visible) for k in (before, after)))
            assert same, "the two kernels disagree"
            old, new = (sorted(times[m])[args.repeats // 2] * 1e6 for m in ("before", "after"))
            print(f"| {length} | {n} | {old:.1f} | {new:.1f} | {old / new:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
