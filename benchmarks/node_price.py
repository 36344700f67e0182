"""What a verified tree node costs where rounds run, and whether retrieval sizing over-verifies, in one process on
ShareGPT tuning prompts (past the draft head's training slice; no evaluation set).

1. `forward_tree` ms by tree size N: `draftwise profile`'s rounds of random shapes against fixed eagle shapes
   (d0 V2, d0 V6, d3 V6), so the in-place samples the cost model is fitted on can be checked against the rounds
   policies choose.
2. `pld` and `rasd` decode tokens/s with the lean target's load-time price per node scaled by each --scales
   factor (1 = as calibrated), alternating per prompt: if a dearer node made them faster, the sizer over-verifies.

    python benchmarks/node_price.py --out benchmarks/runs/node-price.json
    python benchmarks/node_price.py --temperature 1 --skip-shapes --scales 1,2 --out benchmarks/runs/node-price-t1.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import torch

from draftwise.drafters.eagle import EagleDrafter, TreeEagleDrafter
from draftwise.engine import Engine
from draftwise.heads.load import load_head
from draftwise.policies.learn.measure import RandomShapes
from draftwise.training.distill import untrained_sharegpt_prompts


def forward_ms_by_size(engine: Engine, prompts: list[str], max_new_tokens: int) -> dict[str, dict[int, float]]:
    """Median `forward_tree` ms per tree size for each shape, generations interleaved per prompt."""
    head, target = load_head(engine.target, engine.model, engine.model_name), engine.target
    shapes = {
        "random": TreeEagleDrafter(
            head, policy=RandomShapes(3, (1, 2, 3, 4, 6, 8, 12, 16)), top_k=8, depth=3, total_tokens=16
        ),
        "d0 V2": EagleDrafter(head, top_k=8, depth=0, total_tokens=2),
        "d0 V6": EagleDrafter(head, top_k=8, depth=0, total_tokens=6),
        "d3 V6": EagleDrafter(head, top_k=8, depth=3, total_tokens=6),
    }
    samples: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    shape = {"now": ""}

    def timed(size: int, context: int, seconds: float) -> None:  # the target's timing hook
        samples[shape["now"]][size].append(1000 * seconds)

    for drafter in shapes.values():
        engine.generate("Say hi.", drafter=drafter, max_new_tokens=8)  # warm-up
    target.on_forward = timed
    try:
        for prompt in prompts:
            for name, drafter in shapes.items():
                shape["now"] = name
                engine.generate(prompt, drafter=drafter, max_new_tokens=max_new_tokens)
    finally:
        target.on_forward = None
    return {
        name: {n: statistics.median(ms) for n, ms in sorted(by_size.items()) if len(ms) >= 10}
        for name, by_size in samples.items()
    }


def decode_by_node_price(
    engine: Engine, prompts: list[str], methods: list[str], scales: list[float], max_new_tokens: int, **sampling
) -> dict[str, dict]:
    """Decode tokens/s, τ and verified nodes a round of each method with the per-node price scaled."""
    target = engine.target
    calibrated = target.verify_cost

    def priced(scale: float):
        step = calibrated(1)
        return lambda nodes: step + scale * (calibrated(nodes) - step)

    for scale in scales:  # warm-up
        target.verify_cost = priced(scale)
        for method in methods:
            engine.generate(prompts[0], method=method, max_new_tokens=32, **sampling)
    totals: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for i, prompt in enumerate(prompts):
        for method in methods:
            for scale in scales if i % 2 == 0 else scales[::-1]:
                target.verify_cost = priced(scale)
                stats = engine.generate(prompt, method=method, max_new_tokens=max_new_tokens, **sampling).stats
                row = totals[method, scale]
                row[0] += stats.new_tokens
                row[1] += stats.total_s - stats.prefill_s
                row[2] += stats.verified_tokens
                row[3] += stats.rounds
    target.verify_cost = calibrated
    out = {}
    for method in methods:
        reference = totals[method, scales[0]][0] / totals[method, scales[0]][1]
        for scale in scales:
            new, seconds, verified, rounds = totals[method, scale]
            out[f"{method} x{scale:g}"] = {
                "tokens_per_s": new / seconds,
                "ratio": new / seconds / reference,
                "tau": new / rounds,
                "verified_per_round": verified / rounds,
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=10, help="ShareGPT tuning prompts")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--methods", default="pld,rasd")
    parser.add_argument("--scales", default="1,1.5,2.5", help="per-node price factors (the first is the reference)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--skip-shapes", action="store_true", help="only the decode part")
    parser.add_argument("--out", default="benchmarks/runs/node-price.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    engine = Engine.load("smollm2-135m", method="pld", dtype="auto")
    prompts = untrained_sharegpt_prompts(3000, 16)[: args.prompts]
    sampling = {"temperature": args.temperature, "seed": 0} if args.temperature > 0 else {}
    record: dict = {
        "settings": vars(args),
        "node_ms_calibrated": 1000 * (engine.target.verify_cost(2) - engine.target.verify_cost(1)),
    }
    if not args.skip_shapes:
        record["forward_ms_by_size"] = forward_ms_by_size(engine, prompts[:6], 128)
        for name, by_size in record["forward_ms_by_size"].items():
            print(f"{name:7s}", "  ".join(f"N={n}: {ms:.2f}" for n, ms in by_size.items()))
    scales = [float(s) for s in args.scales.split(",")]
    record["decode"] = decode_by_node_price(
        engine, prompts, args.methods.split(","), scales, args.max_new_tokens, **sampling
    )
    for key, row in record["decode"].items():
        print(
            f"{key:10s} {row['tokens_per_s']:7.1f} tok/s ({row['ratio']:.3f}x)  τ {row['tau']:.2f}  "
            f"V/round {row['verified_per_round']:.2f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
