"""A learned policy fitted twice, once per decoding mode, asked by the rounds' sampling temperature."""

from __future__ import annotations

from draftwise.core.tree import DraftTree
from draftwise.core.verify import Sampling
from draftwise.drafters.tree_policy import TreePolicy


class PerMode(TreePolicy):
    """A learned policy fitted twice, on greedy decoding's rounds and on sampled text's (`log-rounds --trajectory
    sampled`): less of sampled text is accepted, so smaller trees pay there. Rounds at or above the temperature the
    sampling fit's text was drawn at ask that fit, the others the greedy one (below that temperature the greedy fit
    ran as fast or faster: docs/results.md). Both share one tree shape."""

    def __init__(self, greedy: TreePolicy, sampling: TreePolicy, temperature: float = 1.0):
        self.greedy, self.sampling, self.active, self.temperature = greedy, sampling, greedy, temperature
        self.name, self.config = greedy.name, greedy.config

    def use(self, sampling: Sampling) -> None:
        self.active = self.sampling if sampling.temperature >= self.temperature else self.greedy

    def begin_round(self, committed: int):
        return self.active.begin_round(committed)

    def verify_size(self, candidates: DraftTree, budget: int) -> int:
        return self.active.verify_size(candidates, budget)

    def observe(self, result) -> None:
        self.active.observe(result)

    @property
    def queries(self) -> int:
        return self.greedy.queries + self.sampling.queries

    @property
    def query_s(self) -> float:
        return self.greedy.query_s + self.sampling.query_s
