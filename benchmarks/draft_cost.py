"""Cost of one draft-head call (by draft vocabulary and frontier width) and of one target verify forward
(by tree size), on a 300-token context: the numbers that decide the head variant and the tree budget.

    python benchmarks/draft_cost.py --out benchmarks/runs/draft-cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from draftwise.draft_head import DraftHead, DraftHeadConfig, KVCache
from draftwise.kernels import use_small_batch_linear
from draftwise.models import load_model
from draftwise.target import TargetModel
from draftwise.tree import DraftTree


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 2)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/runs/draft-cost.json"))
    args = parser.parse_args()
    model, _ = load_model("smollm2-135m", dtype=args.dtype)
    dtype = next(model.parameters()).dtype
    result: dict = {"dtype": args.dtype, "context": args.context, "threads": torch.get_num_threads()}

    head_ms = {}
    for vocab in (8192, 49152):
        head = DraftHead(DraftHeadConfig.from_target(model.config, (2, 15, 27), vocab)).to(dtype).eval()
        head.attach_embedding(model.get_input_embeddings().weight)
        use_small_batch_linear(head)  # as EagleDrafter does
        c = head.config
        for width in (1, 4, 8, 16):
            cache = KVCache(c.num_kv_heads, c.head_dim, args.context + 64, dtype, "cpu")
            cache.length = args.context
            hidden = torch.randn(width, c.hidden_size, dtype=dtype)
            tokens = torch.randint(0, 1000, (width,))
            positions = torch.full((width,), args.context)
            mask = torch.ones(width, args.context + width, dtype=torch.bool)

            def call(cache=cache, head=head, hidden=hidden, tokens=tokens, positions=positions, mask=mask):
                cache.length = args.context
                head.step(hidden, tokens, positions, cache, mask)

            head_ms[f"vocab{vocab}_width{width}"] = median_ms(call, args.repeats * 3)
    result["head_call_ms"] = head_ms

    target = TargetModel(model, (2, 15, 27))
    prompt = torch.randint(0, 1000, (args.context,))
    verify_ms = {}
    for n in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64):
        tree = DraftTree(torch.randint(0, 1000, (n,)), torch.arange(-1, n - 1), torch.zeros(n))
        target.prefill(prompt)

        def verify(tree=tree):
            target.forward_tree(tree)
            target.truncate(args.context)

        verify_ms[str(n)] = median_ms(verify, args.repeats)
    result["verify_ms"] = verify_ms
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
