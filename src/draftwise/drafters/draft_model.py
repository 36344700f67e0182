"""An independent draft model (any HF causal LM sharing the target's tokenizer).

Greedy and deterministic mode: an EAGLE-2 dynamic top-k tree drafted with tree attention on the draft
model's own KV cache. Sampling mode: a chain sampled from the draft distribution q, carried in the tree
so verification can apply min(1, p/q) and stay lossless.
"""

from __future__ import annotations

import torch
from torch import Tensor

from draftwise.core.drafter import DraftContext, Drafter
from draftwise.core.tree import DraftTree
from draftwise.drafters.dynamic_tree import TreeSlots, grow_dynamic_tree, sample_chain
from draftwise.targets.hf import HFTarget


class DraftModel(Drafter):
    name = "draft-model"

    def __init__(self, model, top_k: int = 4, depth: int = 4, total_tokens: int = 16, vocab_size: int | None = None):
        super().__init__()
        self.runner = HFTarget(model)
        self.top_k, self.depth, self.total_tokens = top_k, depth, total_tokens
        self.vocab_size = vocab_size

    def begin(self, prompt_ids: Tensor, features: Tensor | None) -> None:
        self.runner.reset()

    def _catch_up(self, tokens: Tensor) -> Tensor:
        """Feed every committed token the draft cache lacks; returns the logits after the last one."""
        past = self.runner.length
        new = tokens[past:]
        n = new.numel()
        positions = torch.arange(past, past + n)[None]
        mask = torch.ones(n, past + n, dtype=torch.bool).tril(past)[None, None]
        self.draft_calls += 1
        return self._trim(self.runner.forward(new, positions, mask).logits[-1])

    def _trim(self, logits: Tensor) -> Tensor:
        return logits[..., : self.vocab_size] if self.vocab_size else logits

    def propose(self, context: DraftContext) -> DraftTree:
        tokens = context.tokens
        committed = tokens.numel()
        root_logits = self._catch_up(tokens)
        budget = min(self.total_tokens, context.budget)
        try:
            if context.sampling.greedy:
                return self._tree(int(tokens[-1]), root_logits, committed, budget)
            return self._sampled_chain(int(tokens[-1]), root_logits, committed, budget, context)
        finally:
            self.runner.truncate(committed)

    def _tree(self, root: int, root_logits: Tensor, committed: int, budget: int) -> DraftTree:
        slots = TreeSlots(committed)

        def step(frontier: Tensor, frontier_tokens: Tensor, parents: Tensor) -> Tensor:
            past = self.runner.length
            mask, depth = slots.frontier_mask(frontier, parents, past)
            positions = torch.full((1, frontier.numel()), committed - 1 + depth)  # the frontier shares one depth
            self.draft_calls += 1
            return self._trim(self.runner.forward(frontier_tokens, positions, mask[None, None]).logits).log_softmax(-1)

        return grow_dynamic_tree(root, root_logits.log_softmax(-1), step, self.top_k, self.depth, budget)

    def _sampled_chain(
        self, root: int, root_logits: Tensor, committed: int, budget: int, context: DraftContext
    ) -> DraftTree:
        def next_logits(token: int) -> Tensor:
            past = self.runner.length
            mask = torch.ones(1, 1, 1, past + 1, dtype=torch.bool)
            self.draft_calls += 1
            return self._trim(self.runner.forward(torch.tensor([token]), torch.tensor([[past]]), mask).logits[0])

        length = min(self.depth + 1, budget - 1)
        return sample_chain(root, root_logits, next_logits, length, context.sampling, context.generator)
