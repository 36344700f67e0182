"""RADAR's and LTD's training (draftwise.policies.learn) improve their objective on a synthetic log."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    cost_model,
    synthetic_rounds,
)

from draftwise.policies.learn.ltd import train_ltd
from draftwise.policies.learn.radar import evaluate, train_radar
from draftwise.policies.ltd import LtdConfig
from draftwise.policies.radar import RadarConfig, RadarNet

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread


def test_radar_training_improves_its_objective():
    rounds = synthetic_rounds()
    train, validation = rounds.split_by_prompt(0.2)
    cost = cost_model()
    config = RadarConfig(top_k=4, depth=4, size=16, alpha=0.05, beta=0.05, sample=False)
    torch.manual_seed(0)
    before = evaluate(RadarNet(4), validation, cost, config)
    net, history = train_radar(train, validation, cost, config, epochs=8, batch_size=32, lr=3e-3, progress=False)
    after = evaluate(net, validation, cost, config)
    assert len(history) == 8
    assert after["speed_ratio"] > before["speed_ratio"]
    assert after["speed_ratio"] > 1.05  # stopping at once on hopeless rounds beats the fixed depth
    assert after["calls_reduction"] > 0.2 and after["tau_ratio"] > 0.98


def test_ltd_training_improves_its_objective():
    from draftwise.policies.learn.ltd import PpoSettings, argmax_actor
    from draftwise.policies.learn.ltd import evaluate as ltd_evaluate

    rounds = synthetic_rounds(400)
    train, validation = rounds.split_by_prompt(0.2)
    cost = cost_model()
    config = LtdConfig(top_k=4, max_depth=4, sizes=(1, 2, 4, 8, 16), default_depth=2, default_size=8)
    config.depth_arch, config.size_arch = [64], [64]
    ppo = PpoSettings(n_steps=256, batch_size=64, n_epochs=4, learning_rate=3e-3)
    steps = {"size0": 512, "depth0": 1024, "size1": 256, "depth2": 0, "size3": 0}
    policy, log = train_ltd(train, validation, cost, config, steps, ppo, progress=False)
    default = ltd_evaluate(validation, cost, config, None, None)
    trained = ltd_evaluate(validation, cost, config, argmax_actor(policy.depth_actor), argmax_actor(policy.size_actor))
    assert [entry["stage"] for entry in log][:3] == [
        "size alone (uniform depth)",
        "depth alone (default V)",
        "iter0: both",
    ]
    assert trained["tokens_per_s"] > 1.1 * default["tokens_per_s"]
