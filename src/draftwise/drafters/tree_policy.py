"""The questions a tree policy answers for a tree drafter, each round: how deep to draft and how much to verify.

EagleDrafter asks them; RADAR, LTD and the hand-written baselines (draftwise.policies) answer them.
"""

from __future__ import annotations

from draftwise.core.drafter import RoundResult
from draftwise.core.tree import DraftTree
from draftwise.core.verify import Sampling
from draftwise.drafters.dynamic_tree import KeepGoing


class TreePolicy:
    """How much to draft and verify each round (RADAR, LTD and the baselines implement this).
    The default is EAGLE-2's: always the full depth, always `total_tokens`."""

    name = "fixed"
    queries, query_s = 0, 0.0  # a learned policy's own queries and their seconds, reported in the stats

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
