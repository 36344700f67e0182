"""The Target protocol (draftwise.core.target): every backend answers it, compute modes name their shipped policy
directories, and the timing hooks report each forward and draft-head call when set and cost nothing when not."""

from __future__ import annotations

import pytest
import torch
from conftest import run, tiny_eagle

from draftwise.core.target import ComputeMode, Target
from draftwise.policies.cost import POLICIES_DIR
from draftwise.targets.hf import HFTarget
from draftwise.targets.lean.model import LeanTarget
from draftwise.targets.llama_cpp import LlamaCppTarget

NAMES = ("float32", "bfloat16", "bfloat16+int4", "float32+int4", "float32+w4a8", "gguf")


@pytest.mark.parametrize("name", NAMES)
def test_compute_mode_names_round_trip(name):
    mode = ComputeMode.parse(name)
    assert mode.name == str(mode) == name
    assert mode.dir_name == name.replace("+", "-")
    assert (mode.weights is not None) == ("+" in name)


def test_shipped_policy_directories_are_compute_mode_names():
    shipped = {p.name for p in (POLICIES_DIR / "smollm2-135m").iterdir() if (p / "cost.json").exists()}
    known = {ComputeMode.parse(n).dir_name for n in NAMES} | {"bfloat16-int4-avx2"}
    assert shipped and shipped <= known


def test_every_backend_answers_the_protocol(tiny_model):
    members = [n for n in Target.__annotations__] + ["compute", "length", "reset", "prefill", "forward_tree"]
    members += ["commit", "truncate"]
    for target in (HFTarget(tiny_model), LeanTarget(tiny_model)):
        assert all(hasattr(target, m) for m in members), type(target).__name__
        assert isinstance(target.compute, ComputeMode)
    members = [m for m in members if m not in ("config", "device", "max_length")]  # set when it loads a GGUF
    assert all(hasattr(LlamaCppTarget, m) for m in members)


@pytest.mark.parametrize("target_class", [HFTarget, LeanTarget], ids=["hf", "lean"])
def test_timing_hooks_see_every_forward_and_head_call(tiny_model, target_class):
    drafter = tiny_eagle(tiny_model, top_k=2, depth=2, total_tokens=5)
    quiet, stats = run(tiny_model, drafter, [5, 9, 11, 3], 12, target_class=target_class)
    forwards, steps = [], []
    drafter.head.on_step = lambda width, context, seconds: steps.append((width, context, seconds))

    class Timed(target_class):
        on_forward = staticmethod(lambda nodes, context, seconds: forwards.append((nodes, context, seconds)))

    timed, timed_stats = run(tiny_model, drafter, [5, 9, 11, 3], 12, target_class=Timed)
    drafter.head.on_step = None
    assert timed == quiet  # the hooks only watch
    assert [n for n, _, _ in forwards] == timed_stats.round_verified
    assert [c for _, c, _ in forwards] == sorted(c for _, c, _ in forwards)  # contexts grow round by round
    assert len(steps) == timed_stats.draft_calls and all(s > 0 for *_, s in forwards + steps)
    assert HFTarget.on_forward is None and LeanTarget.on_forward is None and drafter.head.on_step is None
    torch.testing.assert_close(torch.tensor(stats.round_verified), torch.tensor(timed_stats.round_verified))
