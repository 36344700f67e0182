"""Cost-aware tree sizing: verify only as many drafted nodes as pay for their verification time.

Where every verified token costs real compute (llama.cpp on a CPU: a few-token tree costs several one-token steps,
docs/results.md), a long retrieved chain loses time unless most of it is accepted. Each node gets an
acceptance probability from running counts of how often nodes of its kind were accepted when their parent
was; the tree keeps the most likely nodes up to the size that maximises expected tokens per second,
(1 + sum of p) / cost(size). Size 1 (the root alone) is plain decoding, so the method never plans to be
slower than `ar` under the measured cost.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence

import torch

from draftwise.core.tree import DraftTree

NodeKind = Hashable


class AcceptanceStats:
    """P(node accepted | parent accepted) per node kind, counted online from verified rounds.

    The estimate is optimistic by `explore`/sqrt(seen) (an upper confidence bound), so kinds that were rarely
    drafted get tried until their rate is known, and a kind that does not pay stops being verified."""

    def __init__(self, prior_accepted: float = 1.0, prior_seen: float = 2.0, explore: float = 0.5):
        self.accepted: dict[NodeKind, float] = defaultdict(lambda: prior_accepted)
        self.seen: dict[NodeKind, float] = defaultdict(lambda: prior_seen)
        self.explore = explore

    def rate(self, kind: NodeKind) -> float:
        seen = self.seen[kind]
        return min(1.0, self.accepted[kind] / seen + self.explore / seen**0.5)

    def path_probs(self, tree: DraftTree, kinds: Sequence[NodeKind]) -> list[float]:
        """Probability that each node's whole path is accepted; the root's is 1."""
        probs = [1.0]
        for i, parent in enumerate(tree.parents.tolist()[1:], start=1):  # parents come first
            probs.append(probs[parent] * self.rate(kinds[i]))
        return probs

    def update(self, tree: DraftTree, kinds: Sequence[NodeKind], path: Sequence[int]) -> None:
        """Count every node whose parent was accepted: it was accepted too, or it was not."""
        on_path = set(path)
        for i, parent in enumerate(tree.parents.tolist()[1:], start=1):
            if parent in on_path:
                self.seen[kinds[i]] += 1
                self.accepted[kinds[i]] += i in on_path


def nodes_for_throughput(probs: Sequence[float], verify_cost: Callable[[int], float]) -> torch.Tensor:
    """Sorted indices of the most likely nodes (root included) whose expected tokens per verification second
    is highest; `probs` are path probabilities, each no higher than its parent's."""
    order = sorted(range(1, len(probs)), key=lambda i: -probs[i])  # stable: a child never outranks its parent
    best_rate, best_keep, expected = 1.0 / verify_cost(1), 0, 1.0
    for kept, node in enumerate(order, start=1):
        expected += probs[node]
        rate = expected / verify_cost(kept + 1)
        if rate > best_rate:
            best_rate, best_keep = rate, kept
    return torch.tensor(sorted([0, *order[:best_keep]]), dtype=torch.long)


def size_for_throughput(tree: DraftTree, probs: Sequence[float], verify_cost: Callable[[int], float]) -> DraftTree:
    """The subtree of the most likely nodes whose expected tokens per verification second is highest."""
    keep = nodes_for_throughput(probs, verify_cost)
    return tree if keep.numel() == tree.size else tree.subtree(keep)


class CostSizer:
    """A drafter's tree sizing by cost: `size` keeps the nodes that pay under the target's measured cost, given
    each node's kind; `observe` counts the verdict on what was kept."""

    def __init__(self) -> None:
        self.stats = AcceptanceStats()
        self._sized: tuple[DraftTree, list[NodeKind]] | None = None

    def size(
        self, tree: DraftTree, kinds: Sequence[NodeKind], verify_cost: Callable[[int], float]
    ) -> tuple[DraftTree, torch.Tensor]:
        """The subtree to verify and its node indices in `tree` (sorted)."""
        keep = nodes_for_throughput(self.stats.path_probs(tree, kinds), verify_cost)
        sized = tree if keep.numel() == tree.size else tree.subtree(keep)
        self._sized = (sized, [kinds[i] for i in keep.tolist()])
        return sized, keep

    def observe(self, path: Sequence[int]) -> None:
        if self._sized is not None:
            self.stats.update(*self._sized, path)
            self._sized = None
