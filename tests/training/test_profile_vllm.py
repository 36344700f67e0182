"""Fitting vLLM's step time, the acceptance model and the batch-size schedule (training/profile_vllm.py) on
synthetic proposer logs whose truth is known."""

from __future__ import annotations

import numpy as np
import pytest

from draftwise.core.errors import DraftwiseError
from draftwise.integrations.vllm import LengthPolicy
from draftwise.training.profile_vllm import best_schedule, fit_acceptance, fit_cost, offline_rates


def _logs(seed: int = 0):
    """Steps cost 10 ms + 0.3 ms a token; a draft's token j is accepted with probability 0.2 + 0.6 * its share."""
    rng = np.random.default_rng(seed)
    steps = [
        {"batch": b, "tokens": (t := b + int(rng.integers(0, 6 * b + 1))), "step_ms": 10 + 0.3 * t}
        for b in (1, 2, 4, 8, 16)
        for _ in range(60)
    ]
    drafts = []
    for _ in range(1500):
        depth = int(rng.integers(1, 7))
        feats = [[1.0, rng.random(), rng.random(), 0.3, rng.random(), j / 8] for j in range(depth)]
        accepted = 0
        while accepted < depth and rng.random() < 0.2 + 0.6 * feats[accepted][2]:
            accepted += 1
        drafts.append({"features": feats, "accepted": accepted})
    return steps, drafts


def test_the_fits_recover_the_step_time_and_what_predicts_acceptance():
    steps, drafts = _logs()
    assert fit_cost(steps) == pytest.approx([10.0, 0.0, 0.3, 0.0], abs=1e-3)
    weights = fit_acceptance(drafts)
    assert weights[2] > 2 and abs(weights[1]) < 0.5  # the share predicts acceptance, the noise feature does not


def test_the_schedule_drafts_less_as_the_batch_grows_and_the_learned_length_beats_fixed_k():
    steps, drafts = _logs()
    policy = LengthPolicy(fit_acceptance(drafts), fit_cost(steps))
    schedule = best_schedule(drafts, steps, policy, 6)
    assert schedule[0][0] == 1 and schedule[-1][1] >= 16
    lengths = [k for _, _, k in schedule]
    assert lengths == sorted(lengths, reverse=True)
    for rates in offline_rates(drafts, steps, policy, 6).values():
        best_fixed = max(v for name, v in rates.items() if name.startswith("k="))
        assert best_fixed <= rates["learned"] * 1.01 and rates["learned"] <= rates["oracle"]


def test_too_few_logged_steps_is_one_error():
    with pytest.raises(DraftwiseError, match="too few vLLM steps"):
        fit_cost([{"batch": 1, "tokens": 1, "step_ms": 5.0}])
    with pytest.raises(DraftwiseError, match="too few drafts"):
        fit_acceptance([])
