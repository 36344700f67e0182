"""csrc/avx512.cpp as it was at `--before` against now, in one process: both builds are loaded, an engine per
method is loaded on each, and for every question each method runs on the old kernels and on the new ones, in
turn (the order alternating per question), after a warm-up. Both builds must give the same text token for token
(a change to the kernels that is meant to be exact); the ratio is the decode tokens/s, prefill excluded. First,
each of layer 0's four products alone on 1, 8 and 16 rows (best of 5 means of 200 calls), then one target
forward over N tree nodes at a 300-token context (medians of 7), the builds interleaved.

    python benchmarks/kernel_ab.py --before 717dbcf --questions 4 --out benchmarks/runs/kernel-ab.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils import cpp_extension

import draftwise
import draftwise.kernels
from draftwise.bench.datasets import load_questions

sys.path.insert(0, str(Path(__file__).parent))
from grid_kernel import verify_ms  # noqa: E402

SOURCE = "src/draftwise/csrc/avx512.cpp"


def build_at(commit: str):
    """The AVX-512 extension as csrc/avx512.cpp was at `commit`, built under its own name."""
    directory = Path(tempfile.mkdtemp())
    source = directory / f"avx512_{commit}.cpp"
    source.write_text(subprocess.check_output(["git", "show", f"{commit}:{SOURCE}"], text=True))
    flags = draftwise.kernels.compile_flags(draftwise.kernels.AVX512_FLAGS)
    name = f"draftwise_avx512_{commit}"
    return cpp_extension.load(name, [str(source)], extra_cflags=flags, build_directory=str(directory))


def module_at(commit: str, path: str, name: str):
    """The module at `path` as it was at `commit`, imported under `name`."""
    source = subprocess.check_output(["git", "show", f"{commit}:{path}"], text=True)
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def product_us(module, product, rows: int) -> float:
    """Microseconds of one `vnni_matmul` call on `product`'s weights and `rows` random rows."""
    x = torch.randn(rows, product.codes.shape[1] * (8 if product.nibbles else 4))
    for _ in range(20):
        module.vnni_matmul(x, product.codes, product.scale, product.low, product.nibbles)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(200):
            module.vnni_matmul(x, product.codes, product.scale, product.low, product.nibbles)
        best = min(best, (time.perf_counter() - start) / 200)
    return 1e6 * best


@contextlib.contextmanager
def kernels(module):
    """draftwise.kernels.avx512_kernel() returns `module` inside (engines bind it at load; the acceptance reads it
    per round)."""
    saved = draftwise.kernels._built.get("avx512")
    draftwise.kernels._built["avx512"] = module
    try:
        yield
    finally:
        draftwise.kernels._built["avx512"] = saved


def kernels_of(builds: dict):
    """The context a variant's engines run in: its build of the kernels."""
    return lambda variant: kernels(builds[variant])


def interleaved_decode(
    engines: dict,
    variants: list[str],
    methods: list[str],
    prompts: list[str],
    max_new_tokens: int,
    within,
    **sampling,
) -> tuple[dict[str, float], dict[str, bool]]:
    """Decode tokens/s (prefill excluded) of `engines[method, variant]` over `prompts`, every method on each
    variant in turn per prompt (the order alternating), after a warm-up, each generation inside
    `within(variant)` with `sampling` (temperature, seed; greedy without); and whether the variants gave the same
    tokens for each method. Prints the table."""
    for (_, variant), engine in engines.items():  # warm-up
        with within(variant):
            engine.generate(prompts[0], max_new_tokens=32, **sampling)
    tokens, seconds, ids = defaultdict(int), defaultdict(float), defaultdict(list)
    for i, prompt in enumerate(prompts):
        for method in methods:
            for variant in variants if i % 2 == 0 else variants[::-1]:
                with within(variant):
                    out = engines[method, variant].generate(prompt, max_new_tokens=max_new_tokens, **sampling)
                key = f"{method} / {variant}"
                tokens[key] += out.stats.new_tokens
                seconds[key] += out.stats.total_s - out.stats.prefill_s
                ids[key].append(list(out.token_ids))
    rows = {key: tokens[key] / seconds[key] for key in tokens}
    first, second = variants
    same = {m: ids[f"{m} / {first}"] == ids[f"{m} / {second}"] for m in methods}
    print(f"decode tok/s (prefill excluded), {first} -> {second}")
    for method in methods:
        before, after = rows[f"{method} / {first}"], rows[f"{method} / {second}"]
        print(f"{method:6s} {before:7.1f} -> {after:7.1f}  ({after / before:.3f}x)  same tokens: {same[method]}")
    return rows, same


def ab_parser(description: str) -> argparse.ArgumentParser:
    """The options every in-process A/B script takes: prompts, questions, tokens, methods, output."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--prompts", default="humaneval,mt-bench")
    parser.add_argument("--questions", type=int, default=4, help="per prompt set")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--methods", default="ar,eagle,pld,rasd")
    parser.add_argument("--out", type=Path, default=None)
    return parser


def main() -> None:
    parser = ab_parser(__doc__.splitlines()[0])
    parser.add_argument("--before", default="717dbcf", help="commit whose csrc/avx512.cpp is the baseline")
    args = parser.parse_args()
    torch.set_num_threads(2)
    now = draftwise.kernels.avx512_kernel()
    if now is None:
        raise SystemExit("this CPU has no AVX-512 VNNI: nothing to compare")
    builds = {"before": build_at(args.before), "after": now}
    options = {"rasd": {"datastore": "code"}}
    methods = args.methods.split(",")
    engines = {}
    for variant, module in builds.items():
        with kernels(module):
            for method in methods:
                engines[method, variant] = draftwise.load(method=method, **options.get(method, {}))
    layer = engines[methods[0], "after"].target.layers[0]
    products_us = {}
    for name in ("qkv", "o", "gate_up", "down"):
        for rows in (1, 8, 16):
            product = getattr(layer, name)
            us = {variant: round(product_us(module, product, rows), 1) for variant, module in builds.items()}
            products_us[f"{name} x {rows}"] = us
            print(f"{name:7s} on {rows:2d} rows: {us['before']:6.1f} -> {us['after']:6.1f} us")
    forward_ms = {}
    for nodes in (1, 2, 4, 8, 16):
        times = defaultdict(list)
        for _ in range(3):
            for variant, module in builds.items():
                with kernels(module):
                    times[variant].append(verify_ms(engines[methods[0], variant].target, nodes))
        forward_ms[nodes] = {variant: round(statistics.median(t), 2) for variant, t in times.items()}
        before, after = forward_ms[nodes]["before"], forward_ms[nodes]["after"]
        print(f"forward over {nodes:2d} nodes: {before:6.2f} -> {after:6.2f} ms")
    prompts = [q.turns[0] for q in load_questions(args.prompts, limit=args.questions, first_turn_only=True)]
    rows, same = interleaved_decode(engines, list(builds), methods, prompts, args.max_new_tokens, kernels_of(builds))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {"decode_tokens_per_s": rows, "same_tokens": same, "forward_ms": forward_ms, "products": products_us}
        args.out.write_text(json.dumps({**report, "prompts": args.prompts, "before": args.before}, indent=1))


if __name__ == "__main__":
    main()
