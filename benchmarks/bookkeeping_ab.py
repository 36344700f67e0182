"""The decode loop's Python bookkeeping (tree subsets, greedy acceptance) as it was at `--before` against now, in
one process: for every question each method runs with the old functions and with the new ones, in turn, after a
warm-up. The model's work is the same in both; only the bookkeeping between its calls differs.

    python benchmarks/bookkeeping_ab.py --before 804da76 --questions 4 --out benchmarks/runs/bookkeeping-ab.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

import draftwise
import draftwise.decode
from draftwise.bench.datasets import load_questions
from draftwise.tree import DraftTree


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="804da76", help="commit whose bookkeeping is the baseline")
    parser.add_argument("--prompts", default="humaneval,mt-bench")
    parser.add_argument("--questions", type=int, default=4, help="per prompt set")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--methods", default="eagle,pld,rasd")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    old_tree = module_at(args.before, "src/draftwise/tree.py", "tree_before")
    old_verify = module_at(args.before, "src/draftwise/verify.py", "verify_before")
    variants = {
        "before": (old_tree.DraftTree.subtree, old_tree.DraftTree.select_top, old_verify.accept_greedy),
        "after": (DraftTree.subtree, DraftTree.select_top, draftwise.decode.accept_greedy),
    }
    options = {"rasd": {"datastore": "code"}}
    methods = args.methods.split(",")
    engines = {m: draftwise.load(method=m, **options.get(m, {})) for m in methods}
    prompts = [q.turns[0] for q in load_questions(args.prompts, limit=args.questions, first_turn_only=True)]
    for engine in engines.values():  # warm-up
        engine.generate(prompts[0], max_new_tokens=32)
    tokens, seconds, texts = defaultdict(int), defaultdict(float), defaultdict(list)
    for i, prompt in enumerate(prompts):
        for method in methods:
            order = list(variants) if i % 2 == 0 else list(variants)[::-1]
            for variant in order:
                DraftTree.subtree, DraftTree.select_top, draftwise.decode.accept_greedy = variants[variant]
                out = engines[method].generate(prompt, max_new_tokens=args.max_new_tokens)
                key = f"{method} / {variant}"
                tokens[key] += out.stats.new_tokens
                seconds[key] += out.stats.total_s - out.stats.prefill_s
                texts[key].append(out.text)
    DraftTree.subtree, DraftTree.select_top, draftwise.decode.accept_greedy = variants["after"]
    rows = {key: tokens[key] / seconds[key] for key in tokens}
    print("decode tok/s (prefill excluded), bookkeeping before -> after")
    for method in methods:
        before, after = rows[f"{method} / before"], rows[f"{method} / after"]
        same = texts[f"{method} / before"] == texts[f"{method} / after"]
        print(f"{method:6s} {before:7.1f} -> {after:7.1f}  ({after / before:.3f}x)  same text: {same}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {"decode_tokens_per_s": rows, "prompts": args.prompts, "questions": args.questions}
        args.out.write_text(json.dumps({**report, "before": args.before}, indent=1))


if __name__ == "__main__":
    main()
