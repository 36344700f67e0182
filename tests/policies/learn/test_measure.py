"""Measuring round costs (draftwise.policies.learn.measure): isolated and in-place timings and their fits."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    run,
    tiny_eagle,
    tiny_llama,
)

from draftwise.policies.cost import CostModel, PiecewiseLinear
from draftwise.targets.hf import HFTarget

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread


def test_in_place_fit_recovers_what_rounds_add(tiny_model):
    """Generations record every round's shape and wall time; the in-place fit recovers the overhead, per-call and
    per-node extras that real rounds add to an isolated cost model, and drops a term that would fit negative."""
    from draftwise.core.decode import GenerationStats
    from draftwise.policies.learn.measure import fit_in_place

    _, stats = run(tiny_model, tiny_eagle(tiny_model, depth=2, total_tokens=6), [5, 9, 11, 3], 20)
    assert len(stats.round_s) == len(stats.round_verified) == stats.rounds
    assert sum(stats.round_s) == pytest.approx(stats.total_s - stats.prefill_s, rel=0.05)
    rng = np.random.default_rng(0)
    isolated = CostModel(
        PiecewiseLinear([1.0, 8.0], [0.5, 0.7], [0.0, 0.1]), PiecewiseLinear([1.0, 16.0], [6.0, 20.0], [1.0, 5.0]), 0.0
    )
    generations = []
    for _ in range(20):
        calls, size = rng.integers(0, 4, 30), rng.integers(1, 17, 30)
        accepted = rng.integers(1, 4, 30)
        context = 40 - 1 + np.concatenate([[0], np.cumsum(accepted)[:-1]])
        seconds = isolated.round_s(calls, size, context) + (0.8 + 0.3 * calls + 0.05 * (size - 1)) / 1000
        generations.append(
            GenerationStats(
                "x",
                prompt_tokens=40,
                accepted=accepted.tolist(),
                round_draft_calls=calls.tolist(),
                round_verified=size.tolist(),
                round_s=(seconds * (1 + rng.normal(0, 0.01, 30))).tolist(),
            )
        )
    overhead, per_call, per_node = fit_in_place(generations, isolated)
    assert (overhead, per_call, per_node) == pytest.approx((0.8, 0.3, 0.05), abs=0.05)
    for g in generations:  # rounds that cost less per node than the isolated model says: that term is dropped
        g.round_s = (np.asarray(g.round_s) - 0.2e-3 * (np.asarray(g.round_verified) - 1)).tolist()
    assert fit_in_place(generations, isolated)[2] == 0.0
    priced = CostModel(isolated.head, isolated.verify, 0.8, call_extra_ms=0.3, node_extra_ms=0.05)
    assert priced.round_s(2, 5, 100) == pytest.approx(isolated.round_s(2, 5, 100) + (0.8 + 0.6 + 0.2) / 1000)


def test_profile_measurements_on_a_tiny_model(tiny_model):
    from draftwise.policies.learn.measure import measure_head, measure_verify

    verify = measure_verify(HFTarget(tiny_model), (1, 4), (8, 24), repeats=1)
    head = measure_head(tiny_eagle(tiny_model).head, (1, 3), (8,), repeats=1)
    assert [(n, c) for n, c, _ in verify] == [(1, 8), (4, 8), (1, 24), (4, 24)]
    assert [(w, c) for w, c, _ in head] == [(1, 8), (3, 8)]
    assert all(ms > 0 for *_, ms in verify + head)
    assert PiecewiseLinear.fit(verify)(2, 16) > 0


def test_in_place_samples_replace_isolated_ones_and_join_them_smoothly():
    from draftwise.policies.learn.measure import in_place_samples

    isolated = [(n, c, float(n)) for n in (1, 2, 4, 8, 16, 32) for c in (64, 320)]
    in_place = [(n, 100 + i, 2.0 * n) for n in (1, 2, 4) for i in range(25)] + [(8, 50, 99.0)] * 3  # 8: too few
    merged = in_place_samples(isolated, in_place)
    assert not [r for r in merged if r[0] <= 4 and r[1] in (64, 320)]  # in place replaces isolated there
    assert all(ms == 2.0 * x for x, _, ms in merged if x <= 4)
    assert [ms for x, _, ms in merged if x == 8] == [16.0, 16.0]  # past the in-place sizes: x 2, the ratio at 4
    assert in_place_samples(isolated, []) == isolated


def test_profile_times_rounds_of_random_shapes_in_place():
    """`draftwise profile`'s in-place pass: generations whose rounds draw random tree shapes (RandomShapes, a
    TreePolicy), with every forward and head call timed where it ran, and the per-round extras fitted on them."""
    from transformers import AutoTokenizer

    from draftwise.engine import Engine
    from draftwise.policies.learn.measure import fit_in_place, random_shape_rounds
    from draftwise.targets.models import resolve_model

    model = tiny_llama(49152, max_positions=512, peaked=False)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    engine = Engine(model, tokenizer, model_name="tiny", method="ar", backoff="off")  # as training/profiling.py
    head = tiny_eagle(model).head
    rounds = random_shape_rounds(engine, head, ["Name three colours.", "Count to five."], 12)
    assert len(rounds.generations) == 2
    assert engine.target.on_forward is None and head.on_step is None  # the timing hooks are off again
    assert len({n for n, _, _ in rounds.verify_ms}) > 2 and all(ms > 0 for *_, ms in rounds.head_ms)
    partial = CostModel(PiecewiseLinear.fit(rounds.head_ms), PiecewiseLinear.fit(rounds.verify_ms), 0.0)
    assert all(extra >= 0 for extra in fit_in_place(rounds.generations, partial))
