"""Policies by name and on disk (draftwise.policies.load): saved and loaded, shipped per compute mode, per mode."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    DEPTH,
    TOP_K,
    run,
    tiny_eagle,
)

from draftwise.core.target import ComputeMode
from draftwise.core.tree import DraftTree
from draftwise.core.verify import Sampling
from draftwise.drafters.eagle import TreeEagleDrafter
from draftwise.policies.ltd import LtdConfig, LtdPolicy, actors
from draftwise.policies.radar import RadarConfig, RadarNet, RadarPolicy

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread


def test_policies_save_and_load(tmp_path):
    torch.manual_seed(0)
    radar = RadarPolicy(RadarNet(4), RadarConfig(top_k=4, depth=3, size=8, sample=False))
    radar.save(tmp_path)
    loaded = RadarPolicy.load(tmp_path)
    scores = torch.tensor([-0.1, -1.0, -2.0, -3.0])
    radar.begin_round(0)
    loaded.begin_round(0)
    assert [radar.keep_going(i, scores, scores) for i in range(3)] == [
        loaded.keep_going(i, scores, scores) for i in range(3)
    ]
    config = LtdConfig(top_k=4, max_depth=3, sizes=(1, 4, 8), default_depth=2, default_size=4)
    ltd = LtdPolicy(*actors(config), config)
    ltd.save(tmp_path)
    again = LtdPolicy.load(tmp_path)
    tree = DraftTree(torch.zeros(21, dtype=torch.long), torch.tensor([-1] + [0] * 20), -torch.arange(21.0) / 5)
    assert ltd.verify_size(tree, 8) == again.verify_size(tree, 8)


def test_missing_policy_files_are_a_clear_error(tmp_path):
    from draftwise.core.errors import DraftwiseError
    from draftwise.policies.load import make_policy

    for name in ("radar", "ltd"):
        with pytest.raises(DraftwiseError, match="train-policy"):
            make_policy(name, "no-such-model", 5, tmp_path)
    with pytest.raises(DraftwiseError, match="unknown policy"):
        make_policy("nope", "no-such-model", 5)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_the_users_fits_come_first_then_the_shipped_one(monkeypatch, tmp_path, native_bf16):
    """radar and ltd read the user's own fit for the target's compute (what `profile` and `train-policy` write,
    under the user cache) before the shipped fit, which serves every compute that has no fit of its own."""
    from draftwise.policies.cost import POLICIES_DIR
    from draftwise.policies.load import policy_dir

    monkeypatch.setenv("DRAFTWISE_CACHE", str(tmp_path))
    monkeypatch.setattr("draftwise.policies.cost.cpu_has_native_bf16", lambda: native_bf16)
    shipped = POLICIES_DIR / "smollm2-135m" / "float32-w4a8"
    assert (shipped / "ltd.safetensors").exists() and (shipped / "sampling" / "radar.safetensors").exists()
    for name in ("float32", "float32+w4a8", "float32+int4", "bfloat16", "bfloat16+int4"):
        assert policy_dir("smollm2-135m", ComputeMode.parse(name), "ltd") == shipped
    mine = tmp_path / "policies" / "smollm2-135m" / ("bfloat16-int4" if native_bf16 else "bfloat16-int4-avx2")
    mine.mkdir(parents=True)
    (mine / "cost.json").write_text("{}")  # profiled, not yet trained: ltd still comes from the shipped fit
    assert policy_dir("smollm2-135m", ComputeMode("bfloat16", "int4"), "ltd") == shipped
    (mine / "ltd.safetensors").write_bytes(b"")
    assert policy_dir("smollm2-135m", ComputeMode("bfloat16", "int4"), "ltd") == mine
    assert policy_dir("smollm2-135m", ComputeMode("bfloat16", "int4"), "radar") == shipped


def test_per_mode_fits_serve_their_own_decoding_mode(tmp_path, tiny_model):
    """A policy directory with a `sampling/` fit loads as PerMode: greedy rounds ask the greedy fit, rounds at the
    fit's temperature or above the sampling fit, and a sampling fit for another tree shape is refused."""
    from draftwise.core.errors import DraftwiseError
    from draftwise.policies.load import make_policy
    from draftwise.policies.per_mode import PerMode

    config = RadarConfig(top_k=TOP_K, depth=DEPTH, size=12)
    RadarPolicy(RadarNet(TOP_K), config).save(tmp_path)
    RadarPolicy(RadarNet(TOP_K), config).save(tmp_path / "sampling")
    policy = make_policy("radar", "unused", DEPTH, tmp_path)
    assert isinstance(policy, PerMode) and policy.config == config
    head = tiny_eagle(tiny_model).head
    for sampling, asked, idle in ((Sampling(), policy.greedy, policy.sampling), (Sampling(1.0), policy.sampling, None)):
        drafter = TreeEagleDrafter(head, top_k=TOP_K, depth=DEPTH, total_tokens=12, policy=policy)
        before = asked.queries
        run(tiny_model, drafter, [5, 17, 3], 16, sampling=sampling)
        assert asked.queries > before and (idle is None or idle.queries == 0)
    policy.use(Sampling(0.7))  # below the T = 1 its text was drawn at: the greedy fit
    assert policy.active is policy.greedy
    (tmp_path / "sampling" / "radar-validation.json").write_text(json.dumps({"logged": {"temperature": 0.5}}))
    policy = make_policy("radar", "unused", DEPTH, tmp_path)
    policy.use(Sampling(0.7))
    assert policy.active is policy.sampling and policy.temperature == 0.5
    RadarPolicy(RadarNet(TOP_K), RadarConfig(top_k=TOP_K, depth=DEPTH - 1, size=12)).save(tmp_path / "sampling")
    with pytest.raises(DraftwiseError, match="draft different trees"):
        make_policy("radar", "unused", DEPTH, tmp_path)
