"""An independent draft model (any HF causal LM sharing the target's tokenizer).

Greedy and deterministic mode: an EAGLE-2 dynamic top-k tree drafted with tree attention on the draft
model's own KV cache. Sampling mode: a chain sampled from the draft distribution q, carried in the tree
so verification can apply min(1, p/q) and stay lossless.
"""

from __future__ import annotations

import torch
from torch import Tensor

from draftwise.drafters.base import DraftContext, Drafter
from draftwise.drafters.dynamic_tree import grow_dynamic_tree
from draftwise.target import TargetModel
from draftwise.tree import DraftTree
from draftwise.verify import target_probs


class DraftModel(Drafter):
    name = "draft-model"

    def __init__(self, model, top_k: int = 4, depth: int = 4, total_tokens: int = 16, vocab_size: int | None = None):
        super().__init__()
        self.runner = TargetModel(model)
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
        slot_of: dict[int, int] = {}  # draft node id -> draft cache slot (the root sits in the committed part)

        def step(frontier: Tensor, frontier_tokens: Tensor, parents: Tensor) -> Tensor:
            past, k = self.runner.length, frontier.numel()
            parent_list = parents.tolist()
            mask = torch.zeros(k, past + k, dtype=torch.bool)
            mask[:, :committed] = True
            for row, node in enumerate(frontier.tolist()):
                mask[row, past + row] = True
                slot_of[node] = past + row
                ancestor, depth = parent_list[node], 1
                while ancestor > 0:
                    mask[row, slot_of[ancestor]] = True
                    ancestor, depth = parent_list[ancestor], depth + 1
            positions = torch.full((1, k), committed - 1 + depth)  # the frontier shares one depth
            self.draft_calls += 1
            return self._trim(self.runner.forward(frontier_tokens, positions, mask[None, None]).logits).log_softmax(-1)

        return grow_dynamic_tree(root, root_logits.log_softmax(-1), step, self.top_k, self.depth, budget)

    def _sampled_chain(
        self, root: int, root_logits: Tensor, committed: int, budget: int, context: DraftContext
    ) -> DraftTree:
        """depth+1 tokens sampled one after another from q, each q kept for verification."""
        tokens, proposals = [root], [torch.nn.functional.one_hot(torch.tensor(root), root_logits.numel()).float()]
        logits, n_draft = root_logits, min(self.depth + 1, budget - 1)
        for i in range(n_draft):
            q = target_probs(logits, context.sampling)
            token = int(torch.multinomial(q, 1, generator=context.generator))
            tokens.append(token)
            proposals.append(q)
            if i + 1 < n_draft:
                past = self.runner.length
                mask = torch.ones(1, 1, 1, past + 1, dtype=torch.bool)
                self.draft_calls += 1
                logits = self._trim(self.runner.forward(torch.tensor([token]), torch.tensor([[past]]), mask).logits[0])
        n = len(tokens)
        return DraftTree(torch.tensor(tokens), torch.arange(-1, n - 1), torch.zeros(n), torch.stack(proposals))
