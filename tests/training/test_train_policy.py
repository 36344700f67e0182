"""`draftwise train-policy` (draftwise.training.train_policy) on logged rounds, and its choice among runs."""

from __future__ import annotations

import json

import pytest
from conftest import (
    DEPTH,
    TOP_K,
    ModelTreeDrafter,
    cost_model,
    noisy_copy,
    tiny_llama,
)

from draftwise.policies.learn.logger import log_generation
from draftwise.targets.hf import HFTarget

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread


def write_logs(directory, records: list[dict], top_k: int, depth: int, sizes: tuple[int, ...]) -> None:

    from draftwise.policies.learn.logger import write_part

    directory.mkdir(parents=True, exist_ok=True)
    settings = {"top_k": top_k, "depth": depth, "sizes": list(sizes)}
    (directory / "meta.json").write_text(json.dumps({"settings": settings}))
    for prompt_id in sorted({r["prompt_id"] for r in records}):
        write_part(directory / f"part-{prompt_id:05d}.parquet", [r for r in records if r["prompt_id"] == prompt_id])


def test_train_policy_command_on_logged_rounds(tmp_path, capsys):
    """log_generation -> Parquet -> `draftwise train-policy --method radar` -> a policy the drafter loads."""
    from draftwise.cli import main
    from draftwise.policies.learn.offline import load_rounds
    from draftwise.policies.load import make_policy

    model = tiny_llama(vocab_size=32)
    drafter = ModelTreeDrafter(noisy_copy(model, 0.25), TOP_K, DEPTH)
    sizes = (1, 2, 4, 8)
    records = []
    for prompt_id, prompt in enumerate([[5, 7, 3], [1, 2, 3, 4], [9, 9, 8], [20, 21], [3, 1, 4, 1, 5], [6, 6]]):
        for i, record in enumerate(log_generation(HFTarget(model), drafter, prompt, 16, sizes)):
            records.append({"prompt_id": prompt_id, "source": "test", "round": i, **record})
    write_logs(tmp_path / "rounds", records, TOP_K, DEPTH, sizes)
    assert len(load_rounds(tmp_path / "rounds")) == len(records)
    cost_model().save(tmp_path / "cost.json")
    out = tmp_path / "policies"
    argv = ["train-policy", "--method", "radar", "--rounds", str(tmp_path / "rounds"), "--cost"]
    argv += [str(tmp_path / "cost.json"), "--out", str(out), "--depth", "3", "--size", "8", "--epochs", "2"]
    assert main(argv + ["--alphas", "0.02"]) == 0
    printed = capsys.readouterr().out
    assert "offline validation" in printed and "radar" in printed and "threshold" in printed
    assert (out / "radar.safetensors").exists() and (out / "cost.json").exists() and (out / "README.md").exists()
    policy = make_policy("radar", "unused", 3, out)
    assert policy.config.depth == 3 and policy.config.top_k == TOP_K


def test_radar_keeps_the_fastest_run_that_keeps_tau():
    from draftwise.training.train_policy import fastest_keeping_tau

    fast_lossy = (1.20, -1.5, "fast", {"tau_ratio": 0.95})
    slower_keeps = (1.10, -2.0, "keeps", {"tau_ratio": 0.995})
    slowest_keeps = (1.05, -3.0, "slowest", {"tau_ratio": 1.0})
    assert fastest_keeping_tau([fast_lossy, slower_keeps, slowest_keeps], 0.01)[2] == "keeps"
    assert fastest_keeping_tau([fast_lossy, slower_keeps], 0.10)[2] == "fast"
    assert fastest_keeping_tau([fast_lossy], 0.01)[2] == "fast"  # nothing keeps τ: the fastest
    slow_lossy = (1.10, -1.4, "slow but keeps more", {"tau_ratio": 0.98})
    assert fastest_keeping_tau([fast_lossy, slow_lossy], 0.01)[2] == "slow but keeps more"  # the least τ lost
    never_stops = (0.99, -4.0, "never stops", {"tau_ratio": 1.0})
    assert fastest_keeping_tau([fast_lossy, never_stops], 0.01)[2] == "fast"


def test_profile_and_train_policy_never_write_into_the_package(monkeypatch, tmp_path):
    """Their default outputs are under the user cache: the installed package may be read-only, and a reinstall
    would lose what was written there."""
    from draftwise.core.errors import DraftwiseError
    from draftwise.core.target import ComputeMode
    from draftwise.policies.cost import POLICIES_DIR, default_cost_path
    from draftwise.training.train_policy import profiled_cost, writable_fit_dir

    monkeypatch.setenv("DRAFTWISE_CACHE", str(tmp_path))
    cost = default_cost_path("smollm2-135m", ComputeMode.parse("float32+w4a8"))
    assert cost == tmp_path / "policies" / "smollm2-135m" / "float32-w4a8" / "cost.json"
    shipped = POLICIES_DIR / "smollm2-135m" / "float32-w4a8" / "cost.json"
    assert writable_fit_dir(shipped) == tmp_path / "policies" / "smollm2-135m" / "float32-w4a8"
    assert writable_fit_dir(tmp_path / "x" / "cost.json") == tmp_path / "x"
    with pytest.raises(DraftwiseError, match="draftwise profile"):
        profiled_cost("smollm2-135m")
    cost.parent.mkdir(parents=True)
    cost.write_text("{}")
    assert profiled_cost("smollm2-135m") == cost
