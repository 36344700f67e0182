"""The decode loop's bookkeeping with torch's argmax and topk(2) (~120 us each on a tree's logits) against
`verify.top_two` (one C++ pass for the argmax and the near-tie margins), in one process: methods and the two
variants alternate per question after a warm-up.

    python benchmarks/round_overhead.py --questions 4 --max-new-tokens 256 --out benchmarks/runs/round-overhead.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

import draftwise
import draftwise.decode
from draftwise.bench.datasets import load_questions


def torch_top_two(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return logits.topk(2, dim=-1).values, logits.argmax(-1)


VARIANTS = {"torch argmax + topk": torch_top_two, "top_two": draftwise.decode.top_two}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--methods", default="ar,eagle,pld")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    engines = {m: draftwise.load(method=m) for m in args.methods.split(",")}
    prompts = [q.turns[0] for q in load_questions("mt-bench", limit=args.questions)]
    for engine in engines.values():  # warm-up
        engine.generate(prompts[0], max_new_tokens=32)
    tokens, seconds, texts = defaultdict(int), defaultdict(float), defaultdict(list)
    for prompt in prompts:
        for method, engine in engines.items():
            for variant, fn in VARIANTS.items():
                draftwise.decode.top_two = fn
                out = engine.generate(prompt, max_new_tokens=args.max_new_tokens)
                key = f"{method} / {variant}"
                tokens[key] += out.stats.new_tokens
                seconds[key] += out.stats.total_s
                texts[key].append(out.text)
    draftwise.decode.top_two = VARIANTS["top_two"]
    rows = {key: tokens[key] / seconds[key] for key in tokens}
    for method in engines:
        before, after = (rows[f"{method} / {v}"] for v in VARIANTS)
        same = texts[f"{method} / top_two"] == texts[f"{method} / torch argmax + topk"]
        print(f"{method:6s} {before:7.1f} -> {after:7.1f} tok/s  ({after / before:.3f}x)  same text: {same}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"tokens_per_s": rows, "questions": args.questions}, indent=1))


if __name__ == "__main__":
    main()
