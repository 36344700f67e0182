"""The tree attention kernel before and after it took every row of a KV head at once, in one process.

    python benchmarks/attention_kernel_ab.py [--before 783d96d]

Builds csrc/avx512.cpp as it was at `--before` under another name, then times one layer's attention (9 query
heads, 3 KV heads, head_dim 64: the default model's) at several contexts and tree sizes, the two kernels' calls
alternating, and checks that they give the same bits.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

from draftwise.kernels import avx512_kernel

FLAGS = ["-O3", "-ffp-contract=off", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-fopenmp"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default="783d96d", help="commit whose attention kernel is the baseline")
    parser.add_argument("--repeats", type=int, default=41)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    source = work / "avx512_before.cpp"
    old_source = subprocess.check_output(["git", "show", f"{args.before}:src/draftwise/csrc/avx512.cpp"], text=True)
    source.write_text(old_source)
    before = cpp_extension.load("draftwise_avx512_before", [str(source)], build_directory=str(work), extra_cflags=FLAGS)
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
