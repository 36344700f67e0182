"""The runtime policies' NumPy queries act as the networks that training fits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from draftwise.core.tree import DraftTree
from draftwise.policies.ltd import LtdConfig, LtdPolicy, actors
from draftwise.policies.radar import RadarConfig, RadarNet, RadarPolicy

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread


def test_radar_query_matches_its_network():
    """The NumPy query runs the same LSTM cell and MLP as RadarNet (the network training fits), round after round."""

    torch.manual_seed(0)
    net = RadarNet(8).eval()
    policy = RadarPolicy(net, RadarConfig(top_k=8, depth=4, sample=False))  # thresholded: comparable
    for _ in range(5):
        policy.begin_round(0)
        states = -torch.rand(4, 8).sort().values * 6  # the round's frontier score vectors, one per call
        with torch.inference_mode():
            logits = net(states[None])[0]
            hidden = net.lstm(states[None])[0][0]
        for call, scores in enumerate(states):
            assert policy.keep_going(call, scores, scores) == bool(logits[call, 1] >= logits[call, 0])
            assert np.allclose(policy.h, hidden[call].numpy(), atol=1e-5)


def test_ltd_query_matches_its_networks():
    """The NumPy queries read the observations depth_obs / size_obs build and act as the torch actors do."""
    from draftwise.policies.ltd import depth_obs, size_obs

    config = LtdConfig(top_k=4, max_depth=3, sizes=(1, 2, 4, 8), depth_arch=[32], size_arch=[32, 16])
    k, actions = config.top_k, set()
    for trial in range(40):
        torch.manual_seed(trial)
        depth_actor, size_actor = actors(config)
        for layer in (*depth_actor, *size_actor):  # larger weights: the logits must not tie
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.normal_(layer.weight, std=1.0)
        policy = LtdPolicy(depth_actor, size_actor, config)
        calls, context = trial % (config.max_depth + 1), 37 + trial
        scores = -torch.rand(k + calls * k * k).sort().values * 40  # some under the floor
        policy.begin_round(context)
        latest = scores[-k:] if calls == 0 else scores[-k * k :]
        obs = depth_obs(latest.numpy()[None], np.array([context]), np.array([calls]), config)
        assert np.array_equal(policy._observe(policy.depth_buffer, latest, calls), obs[0])
        with torch.inference_mode():
            expected = bool(depth_actor(torch.from_numpy(obs))[0].argmax() == 1)
        assert policy.keep_going(calls, scores[:k], scores) == expected
        parents = torch.zeros(1 + scores.numel(), dtype=torch.long)
        parents[0] = -1
        tree = DraftTree(torch.zeros_like(parents), parents, torch.cat([torch.zeros(1), scores]))
        obs = size_obs(scores.numpy()[None], np.array([context]), np.array([calls]), config)
        with torch.inference_mode():
            size = config.sizes[int(size_actor(torch.from_numpy(obs))[0].argmax())]
        assert policy.verify_size(tree, 100) == size
        actions.update({("go", expected), ("size", size)})
    assert {("go", True), ("go", False)} <= actions and len(actions) >= 4  # the actions were exercised
