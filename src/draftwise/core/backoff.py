"""Back-off: a round where speculation does not pay verifies the root alone, as plain decoding does (issue 35).

Before each round the decode loop asks `Backoff.speculate()`. A speculative round commits τ tokens (bonus
included) in s_spec seconds, a plain round 1 token in s_plain; all three are exponential moving averages of this
generation's own rounds, timed in place (drafting, verification and whatever runs until the next round), so they
follow the request's temperature, top-p and top-k, the drafter and its tree policy, and the machine:

    speculate  ⇔  (τ + z·σ_τ/√n) / s_spec ≥ 1 / s_plain

with σ_τ the spread of τ round to round, n the rounds its mean rests on (at most what the moving average weighs)
and z = `confidence`: a small benefit of the doubt, since τ varies a lot between rounds and a back-off that a
few short rounds set off would cost where speculation pays.

s_plain is always measured, never estimated from a speculative round: a tree of several nodes costs more to
verify than the root alone. So the first round speculates (untimed: a draft head reads the prompt then), the
second runs plain, and the next `warmup` + 1 rounds always speculate (a round right after plain ones is never
timed: a draft head catches up on them in it). After that, when speculation does not pay, `interval` rounds run
plain, then `probe_rounds` speculative rounds probe again: a probe that pays resumes speculation, one that does
not doubles `interval`, and intervals are long enough that probes which do not pay cost at most `probe_budget`
of the time. While speculating, one round in `retime` + 1 runs plain, so that one disturbed plain sample cannot
keep speculation on for good. How deep to draft and how much to verify stays the drafter's and its policy's
(sizing, RADAR, LTD): this is only a floor under them.

A `BackoffMemory` carries the estimates from one generation to the next with the same drafter and sampling
settings: a generation whose predecessors found that speculation did not pay starts backed off, so it neither
speculates its first rounds nor has a draft head read its prompt before the first probe.

Lossless at any temperature: the decision reads only rounds already verified, never this round's draft (a
sampled draft kept or dropped by what it drew would bias the output) nor its verdict. See docs/backoff.md.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable


class BackoffMemory:
    """What earlier generations learned, by (drafter, sampling settings): one per engine. It keeps each key's
    latest `Backoff`, whose estimates are where that generation got to (nothing is copied round by round)."""

    def __init__(self) -> None:
        self.entries: dict[Hashable, Backoff] = {}

    def backoff(self, key: Hashable, **options) -> Backoff:
        return Backoff(memory=self, key=key, **options)


class Backoff:
    """One generation's decision, round by round, to speculate or to verify the root alone."""

    def __init__(
        self,
        min_interval: int = 4,
        max_interval: int = 64,
        warmup: int = 4,
        smoothing: float = 0.1,
        confidence: float = 0.25,
        prior_rounds: int = 2,
        probe_budget: float = 0.02,
        retime: int = 48,
        probe_rounds: int = 2,
        memory: BackoffMemory | None = None,
        key: Hashable = None,
    ):
        self.min_interval, self.max_interval = min_interval, max_interval
        self.warmup, self.smoothing, self.confidence = warmup, smoothing, confidence
        self.probe_budget, self.retime = probe_budget, retime
        self.streak = 0  # speculative rounds since the last plain one
        self.probe_rounds, self.probe_left = probe_rounds, 0
        self.catching_up = False  # the last round speculated after plain ones
        self.weighed = (2 - smoothing) / smoothing  # rounds a moving average rests on, in the long run
        self.interval = min_interval  # plain rounds before the next probe
        self.plain_left = 0  # of this back-off's plain rounds, those still to run
        self.backed_off = self.probing = False
        self.speculated = True  # the last decision
        self.recorded = self.spec_rounds = self.spec_timed = self.plain_timed = 0
        self.tokens = self.tokens_sq = 0.0  # τ: tokens a speculative round commits, bonus included; and τ²
        self.spec_s = 0.0  # seconds a speculative round takes
        self.plain_s = 0.0  # seconds a plain round takes
        self.seeded = False
        known = memory.entries.get(key) if memory is not None else None
        if known is not None and known.spec_timed and known.plain_timed:  # start where it ended, as if warmed up
            self.seeded = True
            self.tokens, self.tokens_sq = known.tokens, known.tokens_sq
            self.spec_s, self.plain_s = known.spec_s, known.plain_s
            # the machine's costs carry over; what a round returns depends on the text, so a new prompt's probes
            # outweigh the carried τ at once (it counts as `prior_rounds` rounds), and it is probed as soon as a
            # first back-off ends: a code prompt after chat ones gets speculation back at its first probe
            self.spec_timed, self.spec_rounds = self.warmup, min(known.spec_rounds, prior_rounds)
            self.plain_timed = 1
            if not known.pays():  # it did not pay: back off from the first round
                self.interval = min(max(min_interval, self.affordable()), max_interval)
                self.plain_left, self.backed_off = self.interval, True
        if memory is not None:
            memory.entries[key] = self

    def _mean(self, mean: float, value: float, count: int) -> float:
        """The running mean after its `count`-th value: plain at first, then exponential (no weight on a start)."""
        return mean + max(self.smoothing, 1 / count) * (value - mean)

    @staticmethod
    def _clip(seconds: float, mean: float, count: int) -> float:
        """A round's time, at most twice the running mean (a page fault or a preempted round is not the rate)."""
        return min(seconds, 2 * mean) if count else seconds

    def pays(self) -> bool:
        """Whether speculative rounds commit tokens at least as fast as plain ones would, by the estimates."""
        if not (self.spec_timed and self.plain_timed):  # nothing to compare: keep speculating
            return True
        spread = max(self.tokens_sq - self.tokens * self.tokens, 0.0)
        tokens = self.tokens + self.confidence * math.sqrt(spread / min(self.spec_rounds, self.weighed))
        return tokens * self.plain_s >= self.spec_s

    def affordable(self) -> int:
        """The fewest plain rounds between probes that keeps what a probe that does not pay loses (its time less
        its tokens', in plain rounds) within `probe_budget` of the time: a deep tree is probed less often."""
        if not (self.spec_timed and self.plain_timed):
            return self.min_interval
        loss = self.probe_rounds * (self.spec_s / self.plain_s - self.tokens)
        return math.ceil(loss / self.probe_budget - 1e-9) if loss > 0 else self.min_interval

    def speculate(self) -> bool:
        """Whether the coming round drafts; False: it verifies the root alone."""
        before = self.speculated
        if self.plain_left > 0:
            self.plain_left -= 1
            self.speculated = False
        elif self.recorded == 1 and not self.plain_timed:  # the first timed round times plain decoding
            self.probing, self.speculated = False, False
        elif self.backed_off:  # the back-off's plain rounds are over: probe
            self.backed_off, self.probing, self.speculated = False, True, True
            self.probe_left = self.probe_rounds - 1
        elif self.probe_left > 0:  # a probe's later rounds: the first one's time is a catch-up's, not a round's
            self.probe_left -= 1
            self.speculated = True
        elif self.streak >= self.retime:  # time plain decoding again: one slow sample must not decide for good
            self.probing, self.speculated = False, False
        elif self.spec_timed < self.warmup or self.pays():
            self.probing, self.speculated = False, True
        else:  # back off, this round included; after a probe that did not pay, twice as long as the last time
            self.interval = max(2 * self.interval if self.probing else self.min_interval, self.affordable())
            self.interval = min(self.interval, self.max_interval)
            self.plain_left = self.interval - 1
            self.backed_off, self.probing, self.speculated = True, False, False
        self.streak = self.streak + 1 if self.speculated else 0
        self.catching_up = self.speculated and not before
        return self.speculated

    def record(self, committed: int, round_s: float) -> None:
        """The last round's outcome: tokens it committed (bonus included) and its wall seconds until the next
        round began."""
        self.recorded += 1
        if not self.speculated:
            if self.seeded and self.recorded == 1:  # the first round's time includes the prefill
                return
            if round_s < self.plain_s / 2:  # far faster than the mean: the earlier samples were disturbed
                self.plain_timed = 0
            round_s = self._clip(round_s, self.plain_s, self.plain_timed)
            self.plain_timed += 1
            self.plain_s = self._mean(self.plain_s, round_s, self.plain_timed)
            return
        self.spec_rounds += 1
        self.tokens = self._mean(self.tokens, committed, self.spec_rounds)
        self.tokens_sq = self._mean(self.tokens_sq, committed * committed, self.spec_rounds)
        # the first round pays one-off costs (a draft head reading the prompt), and one after plain rounds a draft
        # head's catch-up over them: neither is what a speculative round costs
        if self.recorded > 1 and not self.catching_up:
            if self.spec_timed < self.warmup:  # the least of the warm-up: an engine's first rounds pay one-off costs
                self.spec_s = min(self.spec_s, round_s) if self.spec_timed else round_s
                self.spec_timed += 1
                return
            round_s = self._clip(round_s, self.spec_s, self.spec_timed)
            self.spec_timed += 1
            self.spec_s = self._mean(self.spec_s, round_s, self.spec_timed)


class ForcedBackoff(Backoff):
    """Verifies the root alone in a random `plain_share` of rounds, drawn from its own seeded generator (the
    sampling generator is left alone): tests use it to switch between plain and speculative rounds often."""

    def __init__(self, plain_share: float = 0.5, seed: int = 0):
        super().__init__()
        self.plain_share, self.rng = plain_share, random.Random(seed)

    def speculate(self) -> bool:
        self.speculated = self.rng.random() >= self.plain_share
        return self.speculated


__all__ = ["Backoff", "BackoffMemory", "ForcedBackoff"]
