"""Hand-written tree policies to compare the learned ones against.

- fixed: EAGLE-2, every round the full depth and `total_tokens` (draftwise.drafters.eagle.TreePolicy itself);
- threshold: stop drafting once the best frontier node's cumulative log-prob falls under a threshold (the
  confidence rule of DDD-style dynamic depth);
- heuristic: transformers' "heuristic" assistant schedule, on tree depth: two levels deeper after a round
  that accepted every drafted level, one shallower otherwise.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from draftwise.core.drafter import RoundResult
from draftwise.drafters.eagle import TreePolicy
from draftwise.policies.learn.offline import RoundSet

FixedDepth = TreePolicy

# Tuned offline on the training rounds of smollm2-135m's shipped head (`draftwise train-policy` prints the grid):
# about log(0.02); lower keeps more depth, higher stops sooner.
DEFAULT_THRESHOLD = -4.0


class ConfidenceThreshold(TreePolicy):
    """Draft another level only while some frontier node is still likely enough."""

    name = "threshold"

    def __init__(self, threshold: float = DEFAULT_THRESHOLD):
        self.threshold = threshold

    def begin_round(self, committed: int):
        return self.keep_going

    def keep_going(self, calls: int, frontier_scores: Tensor, candidate_scores: Tensor) -> bool:
        return float(frontier_scores.max()) >= self.threshold


def threshold_calls(rounds: RoundSet, threshold: float, max_calls: int) -> np.ndarray:
    """Expansion calls the threshold rule makes on each logged round."""
    calls = np.zeros(len(rounds), dtype=np.int64)
    active = np.ones(len(rounds), dtype=bool)
    for c in range(max_calls):
        active &= rounds.frontier(c).max(1) >= threshold
        calls += active
    return calls


class HeuristicSchedule(TreePolicy):
    """transformers' AssistedCandidateGenerator schedule ("heuristic"), with draft length read as tree depth."""

    name = "heuristic"

    def __init__(self, max_calls: int, start_calls: int | None = None):
        self.max_calls = max_calls
        self.levels = (max_calls if start_calls is None else start_calls) + 1  # tree depth = calls + 1

    def begin_round(self, committed: int):
        return self.keep_going

    def keep_going(self, calls: int, frontier_scores: Tensor, candidate_scores: Tensor) -> bool:
        return calls + 1 < self.levels

    def observe(self, result: RoundResult) -> None:
        drafted = int(result.tree.depths.max()) if result.tree.size > 1 else 0
        if drafted == 0:
            self.levels = min(self.levels + 1, self.max_calls + 1)  # nothing was drafted (no context yet)
        elif len(result.path) - 1 >= drafted:
            self.levels = min(self.levels + 2, self.max_calls + 1)
        else:
            self.levels = max(self.levels - 1, 1)


def heuristic_calls(rounds: RoundSet, max_calls: int, size_index: int) -> np.ndarray:
    """Expansion calls the heuristic schedule makes on logged rounds, replayed prompt by prompt in order."""
    calls = np.zeros(len(rounds), dtype=np.int64)
    levels, previous = max_calls + 1, None
    for i in range(len(rounds)):
        if rounds.prompt_id[i] != previous:
            levels, previous = max_calls + 1, rounds.prompt_id[i]
        calls[i] = levels - 1
        drafted = int(rounds.tree_depth[i, calls[i], size_index])
        accepted = int(rounds.accepted[i, calls[i], size_index])
        levels = min(levels + 2, max_calls + 1) if accepted >= drafted else max(levels - 1, 1)
    return calls
