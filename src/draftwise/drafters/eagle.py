"""EAGLE drafting with a trained draft head (draft_head.py).

The head keeps its own KV cache of committed pairs (target feature at t, token t+1). Each round it first
catches up on the pairs the last verification committed (one call), then grows an EAGLE-2 dynamic tree
(`depth` more calls, each over the top-k frontier) whose expansion keys are dropped afterwards. With
`top_k=1` the tree is a chain. In sampling mode it drafts a sampled chain carrying q, so verification stays
lossless.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from draftwise.draft_head import DraftHead, KVCache
from draftwise.drafters.base import DraftContext, Drafter, RoundResult
from draftwise.drafters.dynamic_tree import KeepGoing, TreeSlots, candidate_tree, sample_chain
from draftwise.errors import DraftwiseError
from draftwise.kernels import avx512_kernel, use_small_batch_linear
from draftwise.lean import quantize_draft_linears
from draftwise.tree import DraftTree
from draftwise.verify import Sampling

HEADS_DIR = Path(__file__).resolve().parent.parent / "data" / "heads"

# (top_k, depth, total_tokens) by what the target computes in, chosen by the tree grids in benchmarks/RESULTS.md
# (head v2, 2-core CPU). transformers fp32: a 4-node tree costs less than one token (the small-batch kernel), so
# V4 wins; transformers bf16: a tree of up to 16 nodes costs about one step, so V8 does. The lean engine's int4
# weights halve a step but not a tree (4 nodes cost 1.3 steps, 8 nodes 1.9), so only the root's best child pays
# there, and barely (benchmarks/runs/tree-grid-lean-bf16.json: 1.03x plain decoding); the same on AVX2 in
# float32+int4 (tree-grid-lean-fp32-int4-avx2.json: d0 V2 1.10x, every other shape slower). On float32+w4a8 (the
# VNNI kernels) 8 nodes cost 1.6 steps, and d0 V2 (1.10x) and d2 V6 (1.09x, τ 2.17) lead
# (tree-grid-lean-fp32-w4a8.json). Depth 0-1 everywhere:
# deeper trees add little τ at this head's accuracy.
TREE_DEFAULTS = {
    "float32": (8, 1, 4),
    "bfloat16": (8, 1, 8),
    "bfloat16+int4": (8, 0, 2),
    "float32+int4": (8, 0, 2),
    "float32+w4a8": (8, 0, 2),
}
# EAGLE-2's fixed tree, deep enough for a stop rule to stop in: what the stop-rule baselines draft and what the
# learned policies are trained and measured against.
EAGLE2_TREE = {"top_k": 8, "depth": 3, "total_tokens": 6}


def target_compute(head: DraftHead) -> str:
    """What the target this head drafts for computes in ("float32", "bfloat16", "bfloat16+int4"): set by
    `load_head`, else the head's own dtype."""
    return getattr(head, "target_compute", None) or str(head.lm_head.weight.dtype).removeprefix("torch.")


def default_shape(compute: str) -> dict[str, int]:
    """The tuned tree shape for a target computing in `compute` (fp32's where none was measured)."""
    top_k, depth, total = TREE_DEFAULTS.get(compute, TREE_DEFAULTS["float32"])
    return {"top_k": top_k, "depth": depth, "total_tokens": total}


def shipped_head_dir(model_name: str) -> Path | None:
    path = HEADS_DIR / model_name
    return path if (path / "head.safetensors").exists() else None


class TreePolicy:
    """How much to draft and verify each round (RADAR, LTD and the baselines implement this).
    The default is EAGLE-2's: always the full depth, always `total_tokens`."""

    name = "fixed"

    def use(self, sampling: Sampling) -> None:
        """The decoding mode of the rounds that follow (a policy fitted per mode switches on it)."""

    def begin_round(self, committed: int) -> KeepGoing | None:
        """A new round starts; returns the stop rule asked before each expansion call (None: full depth)."""
        return None

    def verify_size(self, candidates: DraftTree, budget: int) -> int:
        """How many of the reranked candidates (root included) to verify, at most `budget`."""
        return budget

    def observe(self, result: RoundResult) -> None:
        """The round's verdict."""


class EagleDrafter(Drafter):
    name = "eagle"

    def __init__(
        self,
        head: DraftHead,
        top_k: int | None = None,
        depth: int | None = None,
        total_tokens: int | None = None,
        policy: TreePolicy | None = None,
    ):
        super().__init__()
        shape = default_shape(target_compute(head))
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

    def _call(self, hidden: Tensor, tokens: Tensor, positions: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        self.draft_calls += 1
        return self.head.step(hidden, tokens.to(hidden.device), positions.to(hidden.device), self.cache, mask)

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
        logits, hidden = self._call(self.head.fuse(features), tokens[start + 1 :], positions, mask)
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


def load_head(engine, draft_head: str | None = None) -> DraftHead:
    """The head at `draft_head`, or the one shipped for the engine's model, on the target's device."""
    directory = Path(draft_head) if draft_head else shipped_head_dir(engine.model_name)
    if directory is None:
        raise DraftwiseError(
            f"no draft head ships for model '{engine.model_name}'; train one (`draftwise distill` then "
            "`draftwise train-draft`) and pass --draft-head DIR"
        )
    if engine.model is None:
        raise DraftwiseError("draft heads read the target's hidden features, which only the hf engine exposes")
    target = engine.model
    head = DraftHead.load(directory, dtype=next(target.parameters()).dtype, device=engine.target.device)
    c = head.config
    if c.target_vocab_size != target.config.vocab_size or c.hidden_size != target.config.hidden_size:
        raise DraftwiseError(f"the draft head in {directory} was trained for another model (vocab/hidden size differ)")
    if max(c.feature_layers) > target.config.num_hidden_layers:
        raise DraftwiseError(f"the draft head in {directory} reads layers the model does not have")
    head.target_compute = engine.target.dtype_name
    if "+" in head.target_compute:  # next to a 4-bit target, a full-precision head call would cost 1/6 of a step
        quantize_draft_linears(head)
    if getattr(engine.target, "attention", None) is not None:  # the lean target on csrc/avx512.cpp
        head.kernel = avx512_kernel()
        head.pack_layer()
    return head.attach_embedding(target.get_input_embeddings().weight)


def load_eagle(engine, draft_head: str | None = None, policy: str | None = None, **options) -> EagleDrafter:
    head = load_head(engine, draft_head)
    if policy is not None:  # a named tree policy (draftwise.policies): fixed, threshold, heuristic, radar, ltd
        from draftwise.policies import policy_drafter

        return policy_drafter(head, policy, engine.model_name, **options)
    return EagleDrafter(head, **options)
