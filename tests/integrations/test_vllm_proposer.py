"""The vLLM proposer (draftwise.integrations.vllm) without vLLM: the batch calls vLLM makes, as arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest

from draftwise.core.errors import DraftwiseError
from draftwise.integrations.vllm import (
    ENV,
    Chain,
    LengthPolicy,
    NgramStore,
    Proposer,
    Settings,
    fuse,
    speculative_config,
)


class Batch:
    """vLLM's view of a batch: token_ids_cpu rows and their lengths; `step` appends each row's sampled tokens."""

    def __init__(self, rows: list[list[int]], width: int = 256) -> None:
        self.tokens = np.zeros((len(rows), width), np.int32)
        self.lengths = np.zeros(len(rows), np.int32)
        for i, row in enumerate(rows):
            self.tokens[i, : len(row)] = row
            self.lengths[i] = len(row)

    def step(self, sampled: list[list[int]]) -> None:
        for i, new in enumerate(sampled):
            self.tokens[i, self.lengths[i] : self.lengths[i] + len(new)] = new
            self.lengths[i] += len(new)


def propose(proposer: Proposer, batch: Batch, sampled: list[list[int]]) -> list[list[int]]:
    batch.step(sampled)
    return proposer.propose(sampled, batch.lengths, batch.tokens)


def test_prompt_lookup_drafts_the_continuation_of_the_latest_match():
    proposer = Proposer(settings={"sources": ["prompt"]})
    batch = Batch([[1, 2, 3, 4, 5, 6, 9, 9]])
    assert propose(proposer, batch, [[2, 3]]) == [[4, 5, 6, 9]]


def test_rows_without_sampled_tokens_and_rows_at_the_length_limit_get_no_draft():
    proposer = Proposer(settings={"sources": ["prompt"]})
    proposer.max_model_len = 10
    batch = Batch([[1, 2, 3, 4, 1, 2], [5, 6, 7, 5, 6]])
    drafts = propose(proposer, batch, [[3], []])
    assert drafts[1] == [] and len(drafts) == 2
    assert drafts[0] == [4, 1]  # 7 tokens known, room for 10 - 7 - 1 = 2


def test_other_requests_outputs_are_a_datastore():
    proposer = Proposer(settings={"sources": ["outputs"]})
    first = Batch([[7, 7, 7]])
    propose(proposer, first, [[10]])
    propose(proposer, first, [[11, 12, 13, 14, 15, 16]])  # what request one generated
    second = Batch([[8, 8, 8, 8]])
    propose(proposer, second, [[12]])
    assert propose(proposer, second, [[13]]) == [[14, 15, 16]]


def test_the_datastore_source_needs_a_datastore_and_unknown_settings_are_one_error(monkeypatch):
    with pytest.raises(DraftwiseError, match="needs a datastore"):
        Settings.parse({"sources": ["datastore"]})
    with pytest.raises(DraftwiseError, match="unknown draftwise vLLM setting 'max_gram'"):
        Settings.parse({"max_gram": 3})
    with pytest.raises(DraftwiseError, match="is not JSON"):
        Settings.parse("{max")
    with pytest.raises(DraftwiseError, match="min_ngram .3. must be at most max_ngram .2."):
        Settings.parse({"min_ngram": 3, "max_ngram": 2})
    with pytest.raises(DraftwiseError, match="'learned' needs a policy"):
        Settings.parse({"length": "learned"})
    with pytest.raises(DraftwiseError, match="sources must be"):
        Settings.parse({"sources": ["web"]})
    monkeypatch.setenv(ENV, '{"length": "longest"}')
    with pytest.raises(DraftwiseError, match="length must be"):
        Proposer()


def test_speculative_config_without_vllm_is_one_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(DraftwiseError, match="vLLM is not installed"):
        speculative_config(3)


def test_fusion_follows_the_heaviest_branch_and_counts_agreeing_sources():
    chain = fuse([("prompt", 2, [[1, 2, 3], [1, 5]]), ("outputs", 4, [[1, 5, 6]])], 4)
    assert chain.tokens == [1, 5, 6]
    assert chain.agree == [2, 2, 1] and chain.share[0] == 1.0
    assert chain.share[1] == pytest.approx(6 / 8)


def test_the_outputs_store_forgets_the_oldest_sequences_past_its_capacity():
    store = NgramStore(2, 1, capacity=6)
    store.extend(1, [1, 2, 3, 4])
    store.extend(2, [5, 6, 7, 8])
    assert 1 not in store.sequences
    assert store.lookup([9, 1, 2], 3) == (0, [])
    assert store.lookup([5, 6], 2) == (2, [[7, 8]])


def _policy(base_ms: float, per_token_ms: float, weights=(3.0, 0, 0, 0, 0, 0)) -> LengthPolicy:
    return LengthPolicy(list(weights), [base_ms, 0.0, per_token_ms, 0.0])


def test_the_learned_length_drafts_less_when_tokens_cost_more():
    chain = Chain([1, 2, 3, 4], 3, [1.0] * 4, [1] * 4)
    survival = _policy(20.0, 0.2).survival(chain, 0.5)
    assert survival == sorted(survival, reverse=True) and survival[0] == pytest.approx(1 / (1 + np.exp(-3)))
    likely = [[0.9, 0.8, 0.7, 0.6]] * 4
    assert _policy(20.0, 0.2).lengths(likely) == [4, 4, 4, 4]
    assert _policy(20.0, 200.0).lengths(likely) == [0, 0, 0, 0]
    # a batch whose step costs more per token than a likely token returns takes only the likeliest
    assert _policy(20.0, 4.0).lengths([[0.99, 0.98], [0.2, 0.1]]) == [2, 0]
    # a token costs more in a bigger step (compute-bound): the same chains get shorter as the batch grows
    rising = LengthPolicy([3.0, 0, 0, 0, 0, 0], [20.0, 0.0, 0.5, 0.02])
    assert sum(rising.lengths([[0.8, 0.6, 0.4]] * 2)) / 2 > sum(rising.lengths([[0.8, 0.6, 0.4]] * 32)) / 32


def test_a_learned_policy_file_loads_and_bad_files_are_one_error(tmp_path):
    path = tmp_path / "policy.json"
    _policy(10.0, 1.0).save(path)
    assert LengthPolicy.load(path).step_ms(4, 10) == 20.0
    path.write_text(json.dumps({"weights": [1]}))
    with pytest.raises(DraftwiseError, match="cannot read the vLLM length policy"):
        LengthPolicy.load(path)
    path.write_text(json.dumps({"weights": [1], "cost": [1, 0, 1, 0]}))
    with pytest.raises(DraftwiseError, match="wrong number of weights"):
        LengthPolicy.load(path)


def test_logging_records_each_drafts_verdict_and_step_times(tmp_path):
    log = tmp_path / "rounds.jsonl"
    proposer = Proposer(settings={"sources": ["prompt"], "log": str(log)})
    batch = Batch([[1, 2, 3, 4, 5, 6, 1, 2]])
    assert propose(proposer, batch, [[3]]) == [[4, 5, 6, 1]]
    propose(proposer, batch, [[4, 5, 9]])  # two of four accepted, then the target's own token
    proposer.flush()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    verdicts = [r for r in records if "accepted" in r]
    assert [r["accepted"] for r in verdicts] == [2] and len(verdicts[0]["features"]) == 4
    assert any("step_ms" in r and r["tokens"] == 5 and r["batch"] == 1 for r in records)
    assert proposer.requests and next(iter(proposer.requests.values())).acceptance == pytest.approx(0.5)


def test_a_new_request_in_a_row_is_not_credited_with_the_old_ones_drafts():
    proposer = Proposer(settings={"sources": ["prompt"]})
    batch = Batch([[1, 2, 3, 1, 2]])
    assert propose(proposer, batch, [[3]])
    other = Batch([[9, 8, 7, 9, 8, 7, 9]])  # the row now holds another request
    propose(proposer, other, [[8]])
    assert all(r.acceptance == 0.5 for r in proposer.requests.values())


def test_drafts_are_valid_for_any_batch():
    rng = np.random.default_rng(0)
    proposer = Proposer(settings={"sources": ["prompt", "outputs"]})
    proposer.k = 3
    rows = [list(rng.integers(0, 5, size=rng.integers(1, 40))) for _ in range(8)]
    batch = Batch(rows, width=512)
    for _ in range(20):
        sampled = [list(rng.integers(0, 5, size=rng.integers(0, 4))) for _ in rows]
        drafts = propose(proposer, batch, sampled)
        assert len(drafts) == len(rows)
        for draft, new in zip(drafts, sampled, strict=True):
            assert len(draft) <= 3 and all(0 <= t < 5 for t in draft)
            assert new or not draft
