"""The lean target's weights and KV cache in 4 KB pages (`DRAFTWISE_HUGE_PAGES=0`) against 2 MB pages (the
default, `lean.in_huge_pages`), in one process: an engine per method is loaded each way, then one target forward
over N tree nodes at a 300-token context (medians of 7, the variants interleaved), the time of a RADAR policy
query right after a forward (the Python work of a round runs there), and decoding, every method on each variant
in turn per question. The pages change where bytes live, not what is computed: the tokens must be the same.

    python benchmarks/hugepages_ab.py --questions 4 --out benchmarks/runs/hugepages-ab.json
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

import draftwise
from draftwise.bench.datasets import load_questions
from draftwise.policies import make_policy
from draftwise.tree import DraftTree

sys.path.insert(0, str(Path(__file__).parent))
from grid_kernel import verify_ms  # noqa: E402
from kernel_ab import ab_parser, interleaved_decode  # noqa: E402

VARIANTS = {"4k": "0", "2m": "1"}  # DRAFTWISE_HUGE_PAGES at load


def anon_huge_mb() -> float:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages"):
            return int(line.split()[1]) / 1024
    return 0.0


def query_after_forward_us(target, repeats: int = 40) -> float:
    """Median µs of one RADAR query right after a one-node target forward."""
    policy = make_policy("radar", "smollm2-135m", 3, compute=target.dtype_name)
    scores = -torch.rand(8).sort(descending=True).values * 5
    probe, root, times = torch.tensor([1, 2]), DraftTree.root_only(3), []
    for _ in range(repeats):
        target.prefill(probe)
        target.forward_tree(root)
        keep_going = policy.begin_round(100)
        start = time.perf_counter()
        keep_going(0, scores, scores)
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main() -> None:
    args = ab_parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(2)
    options = {"rasd": {"datastore": "code"}}
    methods = args.methods.split(",")
    engines, huge_mb = {}, {}
    for variant, flag in VARIANTS.items():
        os.environ["DRAFTWISE_HUGE_PAGES"] = flag
        before = anon_huge_mb()
        for method in methods:
            engines[method, variant] = draftwise.load(method=method, **options.get(method, {}))
        huge_mb[variant] = round(anon_huge_mb() - before, 1)
    os.environ.pop("DRAFTWISE_HUGE_PAGES")
    print(f"MB in huge pages gained by loading: {huge_mb}")
    forward_ms = {}
    for nodes in (1, 2, 4, 8, 16):
        times = defaultdict(list)
        for _ in range(3):
            for variant in VARIANTS:
                times[variant].append(verify_ms(engines[methods[0], variant].target, nodes))
        forward_ms[nodes] = {variant: round(statistics.median(t), 2) for variant, t in times.items()}
        print(f"forward over {nodes:2d} nodes: {forward_ms[nodes]['4k']:6.2f} -> {forward_ms[nodes]['2m']:6.2f} ms")
    query_us = defaultdict(list)
    for _ in range(3):
        for variant in VARIANTS:
            query_us[variant].append(query_after_forward_us(engines[methods[0], variant].target))
    query_us = {variant: round(statistics.median(t), 1) for variant, t in query_us.items()}
    print(f"RADAR query after a forward: {query_us['4k']:.0f} -> {query_us['2m']:.0f} us")
    prompts = [q.turns[0] for q in load_questions(args.prompts, limit=args.questions, first_turn_only=True)]
    within = lambda variant: contextlib.nullcontext()  # noqa: E731 - the pages were chosen at load
    rows, same = interleaved_decode(engines, list(VARIANTS), methods, prompts, args.max_new_tokens, within)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {"decode_tokens_per_s": rows, "same_tokens": same, "forward_ms": forward_ms, "query_us": query_us}
        args.out.write_text(json.dumps({**report, "huge_page_mb": huge_mb, "prompts": args.prompts}, indent=1))


if __name__ == "__main__":
    main()
