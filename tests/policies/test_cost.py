"""The round cost model (draftwise.policies.cost): the fit recovers a known curve and round-trips to JSON."""

from __future__ import annotations

import numpy as np
import pytest

from draftwise.policies.cost import CostModel, PiecewiseLinear

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread


def test_cost_fit_recovers_a_known_curve(tmp_path):
    truth = PiecewiseLinear([1, 2, 4, 16, 64], [60, 120, 150, 170, 300], [10, 20, 20, 40, 90])
    rng = np.random.default_rng(0)
    samples = [
        (n, c, truth(n, c) * (1 + rng.normal(0, 0.01)))
        for n in (1, 2, 3, 4, 8, 16, 32, 64)
        for c in (64, 320, 768, 1024)
    ]
    fit = PiecewiseLinear.fit(samples)
    for n, c in [(1, 100), (3, 500), (6, 900), (12, 50), (40, 700), (64, 2000)]:
        assert fit(n, c) == pytest.approx(truth(n, c), rel=0.03)
    cost = CostModel(PiecewiseLinear.fit([(w, 300, 4.0) for w in (1, 8)]), fit, 12.0, {"model": "test"})
    cost.save(tmp_path / "cost.json")
    again = CostModel.load(tmp_path / "cost.json")
    assert again.round_s(6, 16, 300) == pytest.approx(cost.round_s(6, 16, 300))
    assert again.round_s(6, 16, 300) == pytest.approx(0.012 + 6 * 0.004 + fit(16, 300) / 1000, rel=1e-6)
    batch = again.round_s(np.array([1, 6]), np.array([1, 16]), np.array([300, 300]))
    assert batch[1] == pytest.approx(again.round_s(6, 16, 300))
