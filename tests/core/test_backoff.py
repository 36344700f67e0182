"""The back-off rule (core/backoff.py) on synthetic rounds, and in the decode loop on a tiny random llama."""

from __future__ import annotations

import time

import pytest
from conftest import OracleDrafter, RandomDrafter, greedy_reference, run

from draftwise.core.backoff import Backoff, ForcedBackoff
from draftwise.core.drafter import DraftContext, NoDraft
from draftwise.core.errors import DraftwiseError


def simulate(backoff: Backoff, rounds: int, world) -> list[bool]:
    """Decisions over `rounds` rounds, each recorded as `world(speculated, index)` says: (committed, seconds,
    drafting seconds)."""
    decisions = []
    for i in range(rounds):
        speculated = backoff.speculate()
        decisions.append(speculated)
        backoff.record(*world(speculated, i))
    return decisions


def plain_runs(decisions: list[bool]) -> list[int]:
    """Lengths of the runs of plain rounds."""
    runs, length = [], 0
    for speculated in decisions:
        if not speculated:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs + ([length] if length else [])


def test_never_backs_off_where_speculation_pays():
    # 3 tokens in 1.5 s against 1 token in 1 s: twice plain decoding's rate
    decisions = simulate(Backoff(), 300, lambda s, i: (3, 1.5, 0.5) if s else (1, 1.0, 0.0))
    assert all(decisions)


def test_backs_off_and_probes_at_doubling_intervals():
    # 1 token in 1.5 s against 1 token in 1 s; before any plain round, 1.5 - 0.5 s is the plain estimate
    decisions = simulate(Backoff(), 300, lambda s, i: (1, 1.5, 0.5) if s else (1, 1.0, 0.0))
    assert decisions[:9] == [True] * 9  # the first round and eight timed ones always speculate
    assert plain_runs(decisions)[:6] == [4, 8, 16, 32, 64, 64]
    assert decisions.count(True) < 20


def test_a_probe_that_pays_brings_speculation_back():
    """A sequence that becomes predictable (a quotation) from round 100 on, and unpredictable again at 200."""

    def world(speculated: bool, i: int):
        if not speculated:
            return 1, 1.0, 0.0
        return (6, 1.5, 0.5) if 100 <= i < 200 else (1, 1.5, 0.5)

    decisions = simulate(Backoff(), 300, world)
    first_back = decisions.index(True, 100)
    assert first_back < 100 + 64 + 1  # within one back-off interval
    assert all(decisions[first_back:200])
    assert decisions.index(False, 200) < 240  # τ's running mean takes a while to fall below 1.5
    assert plain_runs(decisions[200:])[0] == 4  # the interval was reset when the probe paid


def test_the_plain_estimate_favours_speculating_until_measured():
    backoff = Backoff(warmup=1, smoothing=0.25, confidence=0.0)
    backoff.speculate()
    backoff.record(2, 9.0, 9.0)  # the first round is not timed (one-off costs)
    backoff.speculate()
    backoff.record(1, 2.0, 0.5)  # τ 1.75 in 2 s a round, 1.5 s of it not drafting: 0.875 against 0.667 tokens/s
    assert backoff.pays() and backoff.speculate()
    backoff.record(1, 2.0, 2.0)
    assert not backoff.pays()  # τ 1.56 in 2 s (0.78 tokens/s), against 1 token in 2 - 0.875 s (0.89)
    assert not backoff.speculate()
    backoff.record(1, 0.5, 0.0)  # a plain round measured in place: 0.5 s
    assert backoff.plain_s == pytest.approx(0.5) and not backoff.pays()


def test_a_spread_out_tau_gets_the_benefit_of_the_doubt():
    """τ alternating 1 and 3 (mean 2) in 2.1 s rounds against 1 s plain: by the mean alone it does not pay, but
    one standard error more (σ = 1 over the ~19 rounds the means rest on) it does."""

    def world(speculated: bool, i: int):
        return (1 + 2 * (i % 2), 2.1, 1.0) if speculated else (1, 1.0, 0.0)

    assert all(simulate(Backoff(confidence=1.0), 200, world))
    assert not all(simulate(Backoff(confidence=0.0), 200, world))


def test_forced_backoff_draws_apart_from_the_sampling_generator():
    a, b = ForcedBackoff(0.5, seed=3), ForcedBackoff(0.5, seed=3)
    decisions = [a.speculate() for _ in range(200)]
    assert decisions == [b.speculate() for _ in range(200)]
    assert 60 < decisions.count(False) < 140


class SlowRandom(RandomDrafter):
    """Random drafts that take 5 ms to make: speculation cannot pay."""

    def propose(self, context: DraftContext):
        time.sleep(0.005)
        return super().propose(context)


def test_the_loop_backs_off_a_drafter_that_never_pays_and_keeps_one_that_does(tiny_model):
    prompt = [5, 17, 3]
    truth = greedy_reference(tiny_model, prompt, 160)
    out, slow = run(tiny_model, SlowRandom(96), prompt, 60, backoff=Backoff())
    assert out == truth[:60]
    assert slow.plain_rounds > 30 and slow.summary()["plain_round_share"] == slow.plain_rounds / slow.rounds
    out, oracle = run(tiny_model, OracleDrafter(prompt, truth, 96, depth=9), prompt, 150, backoff=Backoff())
    assert out == truth[:150] and oracle.plain_rounds == 0
    _, plain = run(tiny_model, NoDraft(), prompt, 20, backoff=ForcedBackoff(1.0))
    assert plain.plain_rounds == 0  # ar is plain decoding already: the back-off leaves it alone


def test_engine_option_is_checked(tiny_model):
    from draftwise.engine import Engine

    with pytest.raises(DraftwiseError, match="backoff must be one of on, off"):
        Engine(tiny_model, None, method="ar", backoff="sometimes")
