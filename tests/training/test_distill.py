"""Self-distilled data building: truncated-JSON recovery, and a resumable build/load round trip."""

from __future__ import annotations

import json

import pytest
from conftest import (
    tiny_llama,
)
from transformers import AutoTokenizer

from draftwise.cli import main
from draftwise.targets import models
from draftwise.training.distill import _decode_truncated_json_array, build_distill_data, load_distill_data


def test_truncated_json_array_keeps_every_complete_item():
    raw = json.dumps([{"a": 1}, {"b": [2, 3]}, {"c": "x"}])[:-8]  # cut inside the last item
    assert _decode_truncated_json_array(raw) == [{"a": 1}, {"b": [2, 3]}]


@pytest.fixture(scope="module")
def tiny_and_tokenizer():
    return tiny_llama(vocab_size=49152), AutoTokenizer.from_pretrained(models.resolve_model("smollm2-135m"))


def test_build_is_resumable_and_loads_back(tmp_path, tiny_and_tokenizer):
    model, tokenizer = tiny_and_tokenizer
    prompts = ["hello there", "what is two plus two?", "name a colour"]
    assert (
        build_distill_data(model, tokenizer, prompts, tmp_path, (0, 1, 2), max_new_tokens=5, batch_size=2, shard_size=2)
        == 3
    )
    shards = sorted(tmp_path.glob("shard_*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    assert (
        build_distill_data(model, tokenizer, prompts, tmp_path, (0, 1, 2), max_new_tokens=5, batch_size=2, shard_size=2)
        == 3
    )
    assert [p.stat().st_mtime_ns for p in shards] == stamps  # finished shards are not redone
    for sample in load_distill_data(tmp_path):
        n = sample["ids"].numel()
        assert sample["features"].shape == (n, 3, 64)
        assert 0 < int(sample["response_from"]) < n


def test_distill_command_rejects_bad_input(capsys, tmp_path):
    assert main(["distill", "--prompts", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["distill", "--feature-layers", "a,b"]) == 2
    assert main(["distill", "--limit", "0"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_untrained_prompts_skip_what_the_head_was_trained_on(monkeypatch):
    from draftwise.training import distill

    monkeypatch.setattr(distill, "sharegpt_exchanges", lambda limit: [("a", "x"), ("c", "y")][:limit])
    monkeypatch.setattr(distill, "sharegpt_prompts", lambda limit: ["a", "b", "c", "d", "e"][:limit])
    assert distill.untrained_sharegpt_prompts(skip=1, limit=2, trained=2) == ["b", "d"]


def test_offset_skips_prompts_an_earlier_build_answered(tmp_path, monkeypatch):
    from draftwise.training import distill

    cache = tmp_path / "datasets" / "sharegpt_first_turns.json"
    cache.parent.mkdir()
    cache.write_text(json.dumps([f"prompt {i}" for i in range(10)]))
    monkeypatch.setattr(distill, "cache_dir", lambda: tmp_path)
    first, later = distill.sharegpt_prompts(4), distill.sharegpt_prompts(3, offset=4)
    assert first + later == distill.sharegpt_prompts(7)  # the same shuffle, continued
    assert main(["distill", "--offset", "-1"]) == 2


def test_forced_mode_offset_reads_the_exchanges_an_earlier_build_did_not(tmp_path, monkeypatch):

    exchanges = [(f"question {i}", f"answer {i}") for i in range(10)]
    read = []
    command = "draftwise.cli.distill."  # what `draftwise distill` calls
    monkeypatch.setattr(command + "sharegpt_exchanges", lambda limit, seed=0: exchanges[:limit])
    monkeypatch.setattr(command + "load_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(command + "build_forced_data", lambda m, t, pairs, *a, **k: read.extend(pairs) or len(pairs))
    assert main(["distill", "--mode", "forced", "--offset", "4", "--limit", "3", "--out", str(tmp_path)]) == 0
    assert read == exchanges[4:7]
