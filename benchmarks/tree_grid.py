"""Tokens/s of `--method eagle` over a grid of tree shapes, to pick this hardware's defaults.

Tuning prompts are ShareGPT first turns the draft head was not trained on (a slice past the training ones),
never the evaluation sets. Every prompt runs every configuration, in an order rotated per prompt, after a
warm-up; `ar` runs in the same rotation as the baseline.

    python benchmarks/tree_grid.py --prompts 6 --max-new-tokens 96 --out benchmarks/runs/tree-grid.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import draftwise
from draftwise.drafters.eagle import EagleDrafter
from draftwise.training.distill import untrained_sharegpt_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--skip", type=int, default=3000, help="ShareGPT prompts to skip (the training slice)")
    parser.add_argument("--trained", type=int, default=4000, help="ShareGPT exchanges the head was trained on")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--depths", default="3,4,6")
    parser.add_argument("--totals", default="8,12,16,24")
    parser.add_argument("--top-ks", default="8")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/runs/tree-grid.json"))
    args = parser.parse_args()

    engine = draftwise.load(method="eagle", dtype=args.dtype)
    head = engine.drafter("eagle").head
    prompts = untrained_sharegpt_prompts(args.skip, args.prompts, args.trained)
    grid = [
        (int(d), int(t), int(k))
        for d, t, k in itertools.product(args.depths.split(","), args.totals.split(","), args.top_ks.split(","))
    ]
    configs = {"ar": engine.drafter("ar")}
    configs |= {f"d{d}-t{t}-k{k}": EagleDrafter(head, top_k=k, depth=d, total_tokens=t) for d, t, k in grid}
    records: dict[str, list[dict]] = {name: [] for name in configs}
    engine.generate("Say hi.", max_new_tokens=8)
    for i, prompt in enumerate(prompts):
        names = list(configs)
        names = names[i % len(names) :] + names[: i % len(names)]
        for name in names:
            messages = [{"role": "user", "content": prompt}]
            out = engine.generate(messages, drafter=configs[name], max_new_tokens=args.max_new_tokens)
            s = out.stats
            records[name].append({"tokens_per_s": s.tokens_per_s, "tau": s.mean_accepted, "tokens": out.token_ids})
        print(f"prompt {i + 1}/{len(prompts)} done", flush=True)
    base = statistics.mean(r["tokens_per_s"] for r in records["ar"])
    table = []
    for name, rows in records.items():
        tps = statistics.mean(r["tokens_per_s"] for r in rows)
        same = sum(r["tokens"] == a["tokens"] for r, a in zip(rows, records["ar"], strict=True))
        table.append(
            {
                "config": name,
                "tokens_per_s": round(tps, 2),
                "speedup": round(tps / base, 3),
                "tau": round(statistics.mean(r["tau"] for r in rows), 3),
                "identical_to_ar": f"{same}/{len(rows)}",
            }
        )
    table.sort(key=lambda r: -r["tokens_per_s"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "table": table}, indent=2) + "\n")
    for row in table:
        print(row)


if __name__ == "__main__":
    main()
