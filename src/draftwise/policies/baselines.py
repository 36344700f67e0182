"""Hand-written tree policies to compare the learned ones against.

- fixed: EAGLE-2, every round the full depth and `total_tokens` (draftwise.drafters.tree_policy.TreePolicy itself);
- threshold: stop drafting once the best frontier node's cumulative log-prob falls under a threshold (the
  confidence rule of DDD-style dynamic depth);
- heuristic: transformers' "heuristic" assistant schedule, on tree depth: two levels deeper after a round
  that accepted every drafted level, one shallower otherwise.

Their replays on logged rounds: draftwise.policies.learn.baselines.
"""

from __future__ import annotations

from torch import Tensor

from draftwise.core.drafter import RoundResult
from draftwise.drafters.tree_policy import TreePolicy

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
