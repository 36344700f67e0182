"""EAGLE drafting with a trained draft head (draftwise.heads).

The head keeps its own KV cache of committed pairs (target feature at t, token t+1). Each round it first
catches up on the pairs the last verification committed (one call), then grows an EAGLE-2 dynamic tree
(`depth` more calls, each over the top-k frontier) whose expansion keys are dropped afterwards. With
`top_k=1` the tree is a chain. In sampling mode it drafts a sampled chain carrying q, so verification stays
lossless.
"""

from __future__ import annotations

import torch
from torch import Tensor

from draftwise.core.drafter import DraftContext, Drafter, RoundResult
from draftwise.core.errors import DraftwiseError
from draftwise.core.kernels import use_small_batch_linear
from draftwise.core.target import ComputeMode
from draftwise.core.tree import DraftTree
from draftwise.drafters.dynamic_tree import TreeSlots, candidate_tree, sample_chain
from draftwise.drafters.tree_policy import TreePolicy
from draftwise.heads.model import DraftHead, KVCache

# (top_k, depth, total_tokens) by what the target computes in, chosen by tree-shape grids (docs/results.md): where
# a tree costs little more than one token (transformers fp32 and bf16) bigger trees pay; on 4-bit weights a step
# gets cheaper but a tree does not, so only the root's best child pays. Depth 0-1 everywhere: deeper trees add
# little τ at the shipped head's accuracy.
FLOAT32 = ComputeMode("float32")
TREE_DEFAULTS = {
    FLOAT32: (8, 1, 4),
    ComputeMode("bfloat16"): (8, 1, 8),
    ComputeMode("bfloat16", "int4"): (8, 0, 2),
    ComputeMode("float32", "int4"): (8, 0, 2),
    ComputeMode("float32", "w4a8"): (8, 0, 2),
}
# EAGLE-2's fixed tree, deep enough for a stop rule to stop in: what the stop-rule baselines draft and what the
# learned policies are trained and measured against.
EAGLE2_TREE = {"top_k": 8, "depth": 3, "total_tokens": 6}


def default_shape(compute: ComputeMode) -> dict[str, int]:
    """The tuned tree shape for a target computing in `compute` (fp32's where none was measured)."""
    top_k, depth, total = TREE_DEFAULTS.get(compute, TREE_DEFAULTS[FLOAT32])
    return {"top_k": top_k, "depth": depth, "total_tokens": total}


class EagleDrafter(Drafter):
    name = "eagle"

    def __init__(
        self,
        head: DraftHead,
        top_k: int | None = None,
        depth: int | None = None,
        total_tokens: int | None = None,
        policy: TreePolicy | None = None,
        compute: ComputeMode | None = None,
    ):
        """`compute`: what the target computes in, for the tuned tree shape (default: the head's own dtype)."""
        super().__init__()
        shape = default_shape(compute or ComputeMode.dense(head.lm_head.weight.dtype))
        top_k = shape["top_k"] if top_k is None else top_k
        depth = shape["depth"] if depth is None else depth
        total_tokens = shape["total_tokens"] if total_tokens is None else total_tokens
        self.policy = policy or TreePolicy()
        if top_k < 1 or depth < 0 or total_tokens < 1:
            raise DraftwiseError("eagle needs top_k >= 1, depth >= 0 and total_tokens >= 1")
        self.head = head
        use_small_batch_linear(head)
        self.feature_layers = head.config.feature_layers
        self.top_k, self.depth, self.total_tokens = top_k, depth, total_tokens
        weight = head.lm_head.weight
        c = head.config
        self.cache = KVCache(c.num_kv_heads, c.head_dim, 1024, weight.dtype, weight.device)
        self.pending: list[Tensor] = []  # target features of committed tokens not yet paired into the cache

    def begin(self, prompt_ids: Tensor, features: Tensor | None) -> None:
        self.cache.length = 0
        self.pending = [features] if features is not None else []

    def observe(self, result: RoundResult) -> None:
        self.pending.append(result.features)
        self.policy.observe(result)

    def observe_plain(self, result: RoundResult) -> None:
        self.pending.append(result.features)  # the next round's catch-up reads it; the policy shaped no tree

    def policy_queries(self) -> tuple[int, float]:
        return self.policy.queries, self.policy.query_s

    def _call(
        self, hidden: Tensor, tokens: Tensor, positions: Tensor, mask: Tensor, last_only: bool = False
    ) -> tuple[Tensor, Tensor]:
        self.draft_calls += 1
        device = hidden.device
        return self.head.step(hidden, tokens.to(device), positions.to(device), self.cache, mask, last_only)

    @torch.inference_mode()
    def _catch_up(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Pair every new target feature with the token after it; returns the root's logits and hidden."""
        features = torch.cat(self.pending)
        self.pending = []
        start, n = self.cache.length, features.shape[0]
        if start + n != tokens.numel() - 1:
            raise RuntimeError(f"draft head out of step: {start} + {n} pairs for {tokens.numel()} tokens")
        positions = torch.arange(start, start + n)
        mask = torch.ones(n, start + n, dtype=torch.bool).tril(start).to(features.device)
        logits, hidden = self._call(self.head.fuse(features), tokens[start + 1 :], positions, mask, last_only=True)
        return logits[-1], hidden[-1]

    @torch.inference_mode()
    def propose(self, context: DraftContext) -> DraftTree:
        root = int(context.tokens[-1])
        if not self.pending:  # nothing to condition on yet (a one-token prompt)
            return DraftTree.root_only(root)
        root_logits, root_hidden = self._catch_up(context.tokens)
        committed = self.cache.length
        self.policy.use(context.sampling)
        budget = min(self.total_tokens, context.budget)
        try:
            if context.sampling.greedy:
                return self._tree(root, root_logits, root_hidden, committed, budget)
            return self._sampled_chain(root, root_logits, root_hidden, committed, budget, context)
        finally:
            self.cache.length = committed

    def _tree(self, root: int, root_logits: Tensor, root_hidden: Tensor, committed: int, budget: int) -> DraftTree:
        slots, hidden_of = TreeSlots(committed), {0: root_hidden}

        def step(frontier: Tensor, frontier_tokens: Tensor, parents: Tensor) -> Tensor:
            mask, depth = slots.frontier_mask(frontier, parents, self.cache.length)
            hidden = torch.stack([hidden_of[p] for p in parents[frontier].tolist()])
            positions = torch.full((frontier.numel(),), committed - 1 + depth)
            logits, out = self._call(hidden, frontier_tokens, positions, mask.to(hidden.device))
            hidden_of.update(zip(frontier.tolist(), out, strict=True))
            return logits.float().log_softmax(-1).cpu()

        vocab_map = self.head.draft_to_target.cpu()
        lp = root_logits.float().log_softmax(-1).cpu()
        keep_going = self.policy.begin_round(committed)
        candidates = candidate_tree(root, lp, step, self.top_k, self.depth, vocab_map, keep_going)
        return candidates.select_top(max(1, min(budget, self.policy.verify_size(candidates, budget))))

    def _sampled_chain(
        self, root: int, root_logits: Tensor, root_hidden: Tensor, committed: int, budget: int, context: DraftContext
    ) -> DraftTree:
        state = {"hidden": root_hidden}

        def full_vocab(draft_logits: Tensor) -> Tensor:
            logits = torch.full((self.head.config.target_vocab_size,), float("-inf"))
            logits[self.head.draft_to_target.cpu()] = draft_logits.float().cpu()
            return logits

        def next_logits(token: int) -> Tensor:
            position = torch.tensor([self.cache.length])
            mask = torch.ones(1, self.cache.length + 1, dtype=torch.bool, device=root_hidden.device)
            logits, hidden = self._call(state["hidden"][None], torch.tensor([token]), position, mask)
            state["hidden"] = hidden[0]
            return full_vocab(logits[0])

        length = min(self.depth + 1, budget - 1)
        return sample_chain(root, full_vocab(root_logits), next_logits, length, context.sampling, context.generator)


class TreeEagleDrafter(EagleDrafter):
    """EagleDrafter whose every round a TreePolicy shapes, in both decoding modes: at T > 0 it drafts the same
    deterministic EAGLE-2 tree as in greedy mode (instead of a sampled chain), verified by the one-hot-q rule
    of accept_sampling, which keeps it lossless (as EAGLE-2/3 and RADAR do at T = 1)."""

    def _sampled_chain(
        self, root: int, root_logits, root_hidden, committed: int, budget: int, context: DraftContext
    ) -> DraftTree:
        return self._tree(root, root_logits, root_hidden, committed, budget)
