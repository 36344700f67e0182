"""eagle's d0 V1 / V2 / V4 trees in place on the prompts `draftwise log-rounds` logs (its default 32 ShareGPT + 8
GSM-style training prompts, 128 tokens, greedy), alternating per prompt: τ, tok/s and ms a round, to set beside
the offline simulation of the same shapes on the logged rounds (`draftwise.policies.offline.simulate`).

    python benchmarks/v2_v4_in_place.py
"""

from __future__ import annotations

from collections import defaultdict

import torch

from draftwise.drafters.eagle import EagleDrafter, load_head
from draftwise.engine import Engine
from draftwise.policies.logger import training_prompts

SIZES = {"d0 V2": 2, "d0 V4": 4, "d0 V1": 1}


def main() -> None:
    torch.set_num_threads(2)
    engine = Engine.load("smollm2-135m", method="ar", dtype="auto")
    head = load_head(engine)
    for name, size in SIZES.items():
        engine._drafters[name] = EagleDrafter(head, top_k=8, depth=0, total_tokens=size)
        engine.generate("Say hi.", method=name, max_new_tokens=8)  # warm-up
    names = list(SIZES)
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])  # tokens, s, rounds, verify s
    for i, (_, prompt) in enumerate(training_prompts(32, 8)):
        for name in names if i % 2 == 0 else names[::-1]:
            stats = engine.generate(prompt, method=name, max_new_tokens=128).stats
            row = totals[name]
            row[0] += stats.new_tokens
            row[1] += stats.total_s - stats.prefill_s
            row[2] += stats.rounds
            row[3] += stats.verify_s
    for name in names:
        tokens, seconds, rounds, verify = totals[name]
        print(
            f"{name}: τ {tokens / rounds:.3f}, {tokens / seconds:.1f} tok/s, {1000 * seconds / rounds:.2f} ms a round "
            f"({1000 * verify / rounds:.2f} verifying)"
        )
    speed = {name: totals[name][0] / totals[name][1] for name in names}
    print(f"V4 / V2: {speed['d0 V4'] / speed['d0 V2']:.3f}")


if __name__ == "__main__":
    main()
