"""Replaying logged rounds (draftwise.policies.learn.offline and .baselines): fixed trees, baselines, headroom."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import (
    cost_model,
    synthetic_rounds,
)

from draftwise.policies.learn.baselines import heuristic_calls, threshold_calls
from draftwise.policies.learn.offline import (
    best_choices,
    best_fixed,
    fixed,
    headroom,
    simulate,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread


def test_baseline_replays(tiny_model):
    rounds = synthetic_rounds(100)
    calls = threshold_calls(rounds, -1.0, 4)
    easy = rounds.level_scores[:, 0] > -1.0
    assert (calls[easy] == 4).all() and (calls[~easy] == 0).all()
    schedule = heuristic_calls(rounds, 4, rounds.size_index(16))
    assert schedule.min() >= 0 and schedule.max() <= 4
    sim = simulate(rounds, cost_model(), *fixed(rounds, 4, 16))
    assert sim.summary(rounds.sizes)["draft_calls"] == 5


def testbest_choices_is_the_exact_ratio_optimum():
    rng = np.random.default_rng(1)
    tokens, seconds = rng.uniform(1, 4, (6, 3)), rng.uniform(0.5, 2, (6, 3))
    groups = np.asarray([0, 0, 1, 1, 2, 2])
    rows = np.arange(6)
    speeds = [
        tokens[rows, np.asarray(pick)[groups]].sum() / seconds[rows, np.asarray(pick)[groups]].sum()
        for pick in itertools.product(range(3), repeat=3)
    ]
    found = best_choices(tokens, seconds, groups)[groups]
    assert tokens[rows, found].sum() / seconds[rows, found].sum() == pytest.approx(max(speeds))


def test_headroom_bounds_the_fixed_tree_and_reads_the_confidence_signal():
    rounds = synthetic_rounds(400)
    train, validation = rounds.split_by_prompt(0.2)
    cost = cost_model()
    rows = headroom(train, validation, cost, rounds.depth, bins=2)
    _, _, fixed_speed = best_fixed(validation, cost, rounds.depth)
    oracle, bins = rows["hindsight oracle"]["tokens_per_s"], rows["confidence bins (2)"]["tokens_per_s"]
    assert oracle >= bins > 1.05 * fixed_speed  # confident rounds draft deep, hopeless ones verify the root alone
