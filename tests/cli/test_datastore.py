"""`draftwise datastore build` and the errors around missing datastores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    error_of,
)
from safetensors.torch import save_file

from draftwise.cli import main
from draftwise.drafters.retrieval import Datastore


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Default datastores go under a temporary cache; the embedded model stays where it is."""
    from draftwise.targets import models

    model_dir = models.resolve_model("smollm2-135m")
    monkeypatch.setenv("DRAFTWISE_CACHE", str(tmp_path / "cache"))
    resolve = lambda name: model_dir if name == "smollm2-135m" else Path(name)  # noqa: E731
    monkeypatch.setattr(models, "resolve_model", resolve)
    monkeypatch.setattr("draftwise.cli.datastore.resolve_model", resolve)
    return tmp_path


def test_datastore_build_errors(capsys, isolated_cache):
    tmp = isolated_cache
    assert "--corpus must be" in error_of(capsys, ["datastore", "build", "--corpus", "books"])
    assert "--corpus must be" in error_of(capsys, ["datastore", "build", "--corpus", str(tmp / "no.jsonl")])
    assert "--max-tokens" in error_of(capsys, ["datastore", "build", "--corpus", "code", "--max-tokens", "0"])
    empty = tmp / "empty"
    empty.mkdir()
    line = error_of(capsys, ["datastore", "build", "--corpus", "chat", "--distill-dir", str(empty)])
    assert "draftwise distill" in line
    bad = tmp / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "no text"}\n')
    assert "bad.jsonl:2" in error_of(capsys, ["datastore", "build", "--corpus", str(bad), "--out", str(tmp / "o")])
    blank = tmp / "blank.jsonl"
    blank.write_text('{"text": ""}\n')
    assert "corpus is empty" in error_of(capsys, ["datastore", "build", "--corpus", str(blank)])


def test_datastore_build_chat_and_jsonl(capsys, isolated_cache):
    tmp = isolated_cache
    shard = {
        "0000.ids": torch.tensor([1, 2, 3, 40, 41, 42], dtype=torch.int32),
        "0000.response_from": torch.tensor([3]),
        "0000.features": torch.zeros(6, 2, 4, dtype=torch.float16),
        "0001.ids": torch.tensor([7, 8, 50], dtype=torch.int32),
        "0001.response_from": torch.tensor([2]),
        "0001.features": torch.zeros(3, 2, 4, dtype=torch.float16),
    }
    (tmp / "distill").mkdir()
    save_file(shard, str(tmp / "distill" / "shard_00000.safetensors"))
    assert main(["datastore", "build", "--corpus", "chat", "--distill-dir", str(tmp / "distill")]) == 0
    assert "MiB on disk" in capsys.readouterr().out
    store = Datastore.load(tmp / "cache" / "datastores" / "chat")
    assert store.tokens.tolist() == [40, 41, 42, 49152, 50, 49152]  # responses only, separated
    assert store.meta["model"] == "smollm2-135m" and store.meta["corpus"] == "chat"

    texts = tmp / "notes.jsonl"
    texts.write_text("\n".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) for i in range(20)))
    argv = ["datastore", "build", "--corpus", str(texts), "--out", str(tmp / "notes"), "--max-tokens", "50"]
    assert main(argv) == 0
    assert Datastore.load(tmp / "notes").meta["num_tokens"] == 50


def test_generate_with_a_missing_datastore(capsys, isolated_cache):
    argv = ["generate", "hi", "--method", "rest", "--dtype", "fp32"]
    assert "draftwise datastore build --corpus chat`" in error_of(capsys, argv)  # the default datastore
    argv = ["generate", "hi", "--method", "rest", "--datastore", "nowhere", "--dtype", "fp32"]
    assert "datastore build" in error_of(capsys, argv)
