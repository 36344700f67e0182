"""How far llama.cpp's logits move with the batch: the same 4 tokens decoded as one batch (a chain verified in
one forward) or one at a time (plain decoding), at several context lengths. Prints the max |difference| per token.

    python benchmarks/llama_batch_rounding.py          # needs `pip install 'draftwise[llama]'`
    DRAFTWISE_LLAMA_FA=0 python benchmarks/llama_batch_rounding.py   # flash attention off
"""

from __future__ import annotations

import torch

from draftwise.core.tree import DraftTree
from draftwise.targets.load import llama_parts


def chain(ids: list[int]) -> DraftTree:
    return DraftTree(torch.tensor(ids), torch.arange(-1, len(ids) - 1), torch.zeros(len(ids)))


def main() -> None:
    _, target = llama_parts("smollm2-135m")
    tokens = [5, 200, 300, 7]
    for context in (40, 300, 600, 1500):
        prompt = torch.tensor([1000 + (i * 7) % 3000 for i in range(context)])
        target.prefill(prompt)
        batched = target.forward_tree(chain(tokens)).logits
        target.truncate(context)
        alone = []
        for token in tokens:
            past = target.length
            alone.append(target.forward_tree(DraftTree.root_only(token)).logits[0])
            target.commit(past, [0])
        diff = (batched - torch.stack(alone)).abs().max(-1).values
        print(f"context {context:5d}: max |batched - alone| per token {[round(x, 3) for x in diff.tolist()]}")


if __name__ == "__main__":
    main()
