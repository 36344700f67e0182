"""The hand-written baselines (draftwise.policies.baselines) replayed on logged rounds: the expansion calls each
would have made, for the offline tables that learned policies are compared with."""

from __future__ import annotations

import numpy as np

from draftwise.policies.learn.offline import RoundSet


def threshold_calls(rounds: RoundSet, threshold: float, max_calls: int) -> np.ndarray:
    """Expansion calls the threshold rule makes on each logged round."""
    calls = np.zeros(len(rounds), dtype=np.int64)
    active = np.ones(len(rounds), dtype=bool)
    for c in range(max_calls):
        active &= rounds.frontier(c).max(1) >= threshold
        calls += active
    return calls


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
