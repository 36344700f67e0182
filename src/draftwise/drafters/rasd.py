"""RASD (Quan et al. 2025): retrieval trees pruned by the draft head's probabilities and fused into its tree.

Each round, retrieval (prompt lookup and/or a REST datastore) runs in a worker thread while the head drafts,
instead of after it (the paper's first stated limitation), where a core is free for it. Otherwise it runs
first, and where what it found already pays for the round the head's call is skipped (PayoffRule, fitted
online). The retrieval trie's first-level branches are
gated by the head's root distribution, then the kept branches are merged into the EAGLE-2 tree by longest
prefix matching and the fused tree is verified in one pass. Where the target reports its verification cost
(lean, llama.cpp), each source's trie is fused on its own and the fused tree keeps the nodes that pay, counted
by source (sizing.py); elsewhere the sources are pooled into one trie cut to the retrieval budget.
Retrieved tokens are deterministic proposals, so verification stays lossless in greedy and sampling modes
(in sampling mode the head's tree is its deterministic top-k tree too).

The gate (the paper's second limitation: hand-set thresholds) is fitted online from the rounds it logs: a
branch is kept while branches with a similar head probability have added, on average plus an exploration
bonus 1/sqrt(count), at least `min_gain` accepted tokens beyond what the head's own tree got.
`threshold=` replaces the fitted rule by the paper-style fixed gate p >= threshold.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from draftwise.core.drafter import DraftContext, RoundResult
from draftwise.core.tree import DraftTree
from draftwise.drafters.eagle import EagleDrafter
from draftwise.drafters.pld import PLD_TOTAL_TOKENS
from draftwise.drafters.retrieval import Retrieved, Retriever
from draftwise.drafters.sizing import CostSizer, nodes_for_throughput

BUCKET_EDGES = torch.tensor([1e-3, 1e-2, 5e-2, 0.2, 0.5])  # head probability of a branch's first token


class FittedGate:
    """Keeps a retrieval branch when its first token's head-probability bucket has paid off so far."""

    def __init__(self, min_gain: float = 0.3, prior_rounds: float = 2.0, threshold: float | None = None):
        self.min_gain, self.threshold = min_gain, threshold
        buckets = BUCKET_EDGES.numel() + 1
        self.gain = torch.full((buckets,), prior_rounds * 2 * min_gain)  # optimistic prior: try every bucket
        self.count = torch.full((buckets,), prior_rounds)

    def bucket(self, probs: Tensor) -> Tensor:
        return torch.bucketize(probs, BUCKET_EDGES)

    def keep(self, probs: Tensor) -> Tensor:
        if self.threshold is not None:
            return probs >= self.threshold
        b = self.bucket(probs)
        # optimism that shrinks with evidence (an upper confidence bound), so a bucket that once looked
        # useless is still tried now and then instead of being shut off for good
        return self.gain[b] / self.count[b] + self.count[b].rsqrt() >= self.min_gain

    def record(self, probs: Tensor, gains: Tensor) -> None:
        b = self.bucket(probs)
        self.gain.index_add_(0, b, gains.float())
        self.count.index_add_(0, b, torch.ones_like(gains, dtype=torch.float))


class PayoffRule:
    """Whether a call pays: the head's, in a round where retrieval already offers `expected` accepted tokens
    (the sizer's estimate; on a small CPU a head call is a noticeable share of a round, and where prompt lookup
    has a long match the head rarely adds a token), or a retriever's lookup (one bucket). Fitted online like the
    gate: per bucket of `expected`, the mean number of tokens the call's nodes added beyond the others'; the call
    is skipped while that is below what it costs in tokens ((1 + expected) tokens per round times the call's
    share of a step). Every `explore_every`-th skip calls anyway, so a bucket's estimate keeps being checked."""

    EDGES = torch.tensor([0.5, 1.0, 2.0, 3.0, 5.0])

    def __init__(self, explore_every: int = 8, min_rounds: int = 4):
        self.explore_every, self.min_rounds, self.skipped = explore_every, min_rounds, 0
        self.gain = torch.zeros(self.EDGES.numel() + 1)
        self.count = torch.zeros(self.EDGES.numel() + 1)
        self.seconds, self.calls = 0.0, 0  # the call's measured time

    def share(self, step_s: float) -> float:
        """The call's mean time as a share of a step's (0 before it was ever timed: then it never skips)."""
        return self.seconds / self.calls / step_s if self.calls else 0.0

    def timed(self, seconds: float) -> None:
        self.seconds, self.calls = self.seconds + seconds, self.calls + 1

    def skip(self, expected: float, call_share: float) -> bool:
        b = int(torch.bucketize(torch.tensor(expected), self.EDGES))
        if self.count[b] < self.min_rounds or self.gain[b] / self.count[b] >= (1 + expected) * call_share:
            return False
        self.skipped += 1
        return self.skipped % self.explore_every != 0

    def record(self, expected: float, gain: float) -> None:
        b = int(torch.bucketize(torch.tensor(expected), self.EDGES))
        self.gain[b] += gain
        self.count[b] += 1


class RasdDrafter(EagleDrafter):
    name = "rasd"

    def __init__(
        self,
        head,
        retrievers: list[Retriever],
        retrieval_budget: int | None = None,
        concurrent: bool | None = None,
        gate: FittedGate | None = None,
        **eagle_options,
    ):
        super().__init__(head, **eagle_options)
        if concurrent is None:  # a worker thread only helps with a core to spare (docs/results.md)
            concurrent = (os.cpu_count() or 1) > torch.get_num_threads()
        self.retrievers, self.retrieval_budget, self.concurrent = retrievers, retrieval_budget, concurrent
        self.gate = gate or FittedGate()
        self.head_skip = PayoffRule()
        self.source_skip = [PayoffRule() for _ in retrievers]  # one bucket each: does the source pay at all
        self._queried: list[int] = []
        self._found: list[tuple[int, Retrieved]] = []
        self._head_tree: DraftTree | None = None  # the head's tree before fusion, this round
        self._retrieval_only: tuple[DraftTree, float] | None = None  # this round's retrieval trie, its expectation
        # one torch thread in the worker, so it adds no OpenMP threads (why: Engine._check_thread)
        self.pool = (
            ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads, initargs=(1,)) if concurrent else None
        )
        self._branches: list[tuple[int, float]] = []  # this round's kept branches: first node, head probability
        self._draft_tree: DraftTree | None = None
        self.sizer = CostSizer()
        draft_to_target = head.draft_to_target.cpu()
        self._draft_index = torch.full((head.config.target_vocab_size,), -1, dtype=torch.long)
        self._draft_index[draft_to_target] = torch.arange(draft_to_target.numel())

    def _retrieve(self, tokens: Tensor, budget: int, step_s: float | None = None) -> list[tuple[int, Retrieved]]:
        """(retriever index, what it retrieved) of every retriever asked that found something. Where a step's
        seconds are known, a retriever whose tokens have not paid for its time is asked only now and then (a code
        datastore's lookup costs a noticeable share of a step, and on prose it rarely adds a token)."""
        found, self._queried = [], []
        for i, (retriever, rule) in enumerate(zip(self.retrievers, self.source_skip, strict=True)):
            if step_s and rule.skip(0.0, rule.share(step_s)):
                continue
            start = time.perf_counter()
            got = retriever.retrieve(tokens, budget + 1)
            rule.timed(time.perf_counter() - start)
            self._queried.append(i)
            if got is not None and got.tree.size > 1:
                found.append((i, got))
        return found

    def _pooled(self, found: list[tuple[int, Retrieved]], budget: int) -> list[tuple[int, Retrieved]]:
        """Every source's proposals in one trie cut to the retrieval budget by score: where the target gives no
        cost to size by, the budget is what keeps the fused tree small."""
        if len(found) < 2:
            return found
        pooled = found[0][1].tree
        for _, got in found[1:]:
            pooled = pooled.merge(got.tree)
        return [(found[0][0], Retrieved(pooled.select_top(budget + 1), found[0][1].match))]

    @torch.inference_mode()
    def propose(self, context: DraftContext) -> DraftTree:
        tokens, root = context.tokens, int(context.tokens[-1])
        if not self.pending:
            return DraftTree.root_only(root)
        # where the target prices its trees, the sizer drops what does not pay, so retrieval may propose as much
        # as prompt lookup alone does; elsewhere the budget is what keeps the fused tree small
        budget = self.retrieval_budget or (PLD_TOTAL_TOKENS if context.verify_cost else 10)
        step_s = context.verify_cost(1) if context.verify_cost is not None else None
        job = self.pool.submit(self._retrieve, tokens, budget, step_s) if self.pool else None
        found = None if job else self._retrieve(tokens, budget, step_s)
        self._retrieval_only, self._found, self._head_tree = None, found or [], None
        if found and context.verify_cost is not None:  # serial retrieval: the head's call may be skipped
            retrieved, kinds, expected = self._retrieval_tree(root, found, context.verify_cost)
            self._retrieval_only = (retrieved, expected)
            if self.head_skip.skip(expected, self.head_skip.share(step_s)):
                self._draft_tree, self._branches, self._retrieval_only = None, [], None
                return self.sizer.size(retrieved, kinds, context.verify_cost)[0]
        start = time.perf_counter()
        root_logits, root_hidden = self._catch_up(tokens)
        committed = self.cache.length
        self.policy.use(context.sampling)
        try:
            draft = self._tree(root, root_logits, root_hidden, committed, min(self.total_tokens, context.budget))
        finally:
            self.cache.length = committed
        self.head_skip.timed(time.perf_counter() - start)
        found = job.result() if job else found
        self._found, self._head_tree = found, draft
        if context.verify_cost is None:
            found = self._pooled(found, budget)
        pruned = [(source, got.match, *self._prune(got.tree, root_logits)) for source, got in found]
        fused, sources = fuse(draft, [((source, match), tree) for source, match, tree, _ in pruned])
        kept = [branch for *_, branches in pruned for branch in branches]
        # where each kept branch's first token sits in the fused tree, to credit it when the verdict comes
        first_level = {int(fused.tokens[i]): i for i in fused.children()[0]}
        self._draft_tree, self._branches = draft, list({first_level[t]: p for t, p in kept}.items())
        return fused if context.verify_cost is None else self._size(fused, draft, sources, context.verify_cost)

    def _retrieval_tree(self, root: int, found: list[tuple[int, Retrieved]], verify_cost):
        """Every source's trie merged, the kinds of its nodes, and the accepted tokens its sized tree expects."""
        tree, sources = fuse(DraftTree.root_only(root), [((source, got.match), got.tree) for source, got in found])
        kinds = rasd_node_kinds(tree, sources)
        probs = self.sizer.stats.path_probs(tree, kinds)
        keep = nodes_for_throughput(probs, verify_cost).tolist()
        return tree, kinds, sum(probs[i] for i in keep[1:])

    def _size(self, fused: DraftTree, draft: DraftTree, sources: list[tuple[int, int]], verify_cost) -> DraftTree:
        """Where the target measured its tree cost (the lean and llama engines), keep only the nodes that pay:
        acceptance rates per node kind are counted online, as for prompt lookup (sizing.py)."""
        sized, keep = self.sizer.size(fused, rasd_node_kinds(fused, sources), verify_cost)
        new_index = {old: new for new, old in enumerate(keep.tolist())}
        self._branches = [(new_index[node], p) for node, p in self._branches if node in new_index]
        self._draft_tree = draft.subtree(keep[keep < draft.size])  # the head's nodes still come first
        return sized

    def _prune(self, retrieved: DraftTree, root_logits: Tensor) -> tuple[DraftTree, list[tuple[int, float]]]:
        """Drop first-level branches whose first token the head finds unlikely (per the gate); returns the pruned
        tree and the kept branches' (first token, head probability)."""
        first = torch.tensor(retrieved.children()[0], dtype=torch.long)
        draft_ids = self._draft_index[retrieved.tokens[first]]  # -1: outside the head's vocabulary
        root_probs = root_logits.float().softmax(-1).cpu()
        first_probs = torch.where(draft_ids >= 0, root_probs[draft_ids.clamp_min(0)], 0.0)
        keep = self.gate.keep(first_probs)
        kept = first[keep]
        branches = list(zip(retrieved.tokens[kept].tolist(), first_probs[keep].tolist(), strict=True))
        in_kept_branch = retrieved.ancestors[:, kept].any(1)
        in_kept_branch[0] = True
        return retrieved.subtree(in_kept_branch.nonzero().flatten()), branches

    def observe(self, result: RoundResult) -> None:
        super().observe(result)
        self.sizer.observe(result.path)
        accepted = result.tree.tokens[result.path[1:]].tolist()
        if self._retrieval_only is not None:  # what the head's nodes added beyond the retrieval trie's
            retrieved, expected = self._retrieval_only
            self.head_skip.record(expected, len(accepted) - retrieved.prefix_depth(accepted))
        trees = dict(self._found)
        for i in self._queried:  # what each source asked added beyond every other source and the head
            others = [got.tree for j, got in trees.items() if j != i] + [t for t in [self._head_tree] if t is not None]
            covered = max((tree.prefix_depth(accepted) for tree in others), default=0)
            self.source_skip[i].record(0.0, float(len(accepted) - covered) if i in trees else 0.0)
        if not self._branches or self._draft_tree is None:
            return
        accepted_drafts = len(result.path) - 1
        draft_only = self._accepted_in(self._draft_tree, result.tree, result.path)
        probs, gains = [], []
        for node, p in self._branches:
            on_path = len(result.path) > 1 and result.path[1] == node
            probs.append(p)
            gains.append(float(accepted_drafts - draft_only) if on_path else 0.0)
        self.gate.record(torch.tensor(probs), torch.tensor(gains))

    @staticmethod
    def _accepted_in(draft: DraftTree, fused: DraftTree, path: list[int]) -> int:
        """How many of the accepted tokens the head's own tree contained (its nodes come first in `fused`)."""
        n = 0
        for node in path[1:]:
            if node >= draft.size:
                break
            n += 1
        return n


def fuse(base: DraftTree, parts: list[tuple[tuple[int, int], DraftTree]]) -> tuple[DraftTree, list[tuple[int, int]]]:
    """`base` (the head's tree, or a lone root) with every part merged in by longest prefix, and the source of
    each node: (-1, 0) for base's own, else the part's (retriever, match length); a shared node stays base's."""
    tree, sources = base, [(-1, 0)] * base.size
    for source, part in parts:
        before = tree.size
        tree = tree.merge(part)
        sources += [source] * (tree.size - before)
    return tree, sources


def rasd_node_kinds(fused: DraftTree, sources: list[tuple[int, int]]) -> list[tuple]:
    """What predicts a fused node's acceptance: the head's own nodes by depth and cumulative log-probability
    (in nats, bucketed); retrieved nodes by their source (prompt lookup and a datastore differ a lot), how many
    context tokens it matched (as prompt lookup sizes its own trees), depth and whether the source's matches
    all agree on them (score 0)."""
    depths = fused.depths.clamp_max(8).tolist()
    scores = fused.scores.tolist()
    return [
        ("head", d, min(8, int(-s))) if source < 0 else ("retrieved", source, min(match, 4), d, s > -1e-6)
        for d, s, (source, match) in zip(depths, scores, sources, strict=True)
    ]
