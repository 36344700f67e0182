"""Finding models (targets/models.py) without network: hub ids go through huggingface_hub's snapshot_download
(safetensors only, its progress bars), offline gives one error naming the id, local GGUF files convert once."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import error_of, tiny_llama
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from draftwise.cli import main
from draftwise.core.errors import DraftwiseError
from draftwise.targets import models

NOT_FOUND = SimpleNamespace(status_code=404, headers={}, request=None)  # what the hub error reads of a response


def save_tiny_model(path: Path) -> Path:
    """A tiny random llama with a word-level tokenizer, saved as a hub snapshot holds it (safetensors)."""
    tiny_llama().save_pretrained(path)
    vocab = {f"w{i}": i for i in range(96)} | {"[UNK]": 0}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(path)
    return path


def test_hub_id_downloads_safetensors_only_into_the_hf_cache(tmp_path, monkeypatch):
    snapshot = save_tiny_model(tmp_path / "snapshot")
    calls = []

    def snapshot_download(repo_id, **options):
        calls.append((repo_id, options))
        return str(snapshot)

    monkeypatch.setattr(models, "snapshot_download", snapshot_download)
    assert models.resolve_model("owner/tiny-llama") == snapshot
    model, tokenizer = models.load_model("owner/tiny-llama", dtype="fp32")
    assert model.config.model_type == "llama" and tokenizer("w3 w5").input_ids == [3, 5]
    repo_id, options = calls[0]
    assert repo_id == "owner/tiny-llama"
    # no cache_dir (the user's HF cache), no tqdm_class (huggingface_hub's own bars), never pickled weights
    assert set(options) == {"allow_patterns"}
    assert "*.safetensors" in options["allow_patterns"]
    assert not any(p.endswith((".bin", ".pt", ".pth", ".ckpt", "*")) for p in options["allow_patterns"])


def test_a_local_directory_wins_over_a_hub_id(tmp_path, monkeypatch):
    local = save_tiny_model(tmp_path / "owner" / "name")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(models, "snapshot_download", lambda *a, **k: pytest.fail("went to the hub"))
    assert models.resolve_model("owner/name") == Path("owner/name")
    assert local.is_dir()


def test_offline_without_a_cached_copy_is_one_error_naming_the_id(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(DraftwiseError, match="'owner/missing' is not in the Hugging Face cache.*hf download owner/"):
        models.resolve_model("owner/missing")


@pytest.mark.parametrize(
    "error, message",
    [
        (LocalEntryNotFoundError("no network"), "hub cannot be reached"),
        (ConnectionError("connection refused"), "hub cannot be reached"),
        (RepositoryNotFoundError("404", response=NOT_FOUND), "unknown model 'owner/missing'"),
    ],
)
def test_hub_errors_are_one_line(capsys, monkeypatch, error, message):
    def snapshot_download(repo_id, **options):
        raise error

    monkeypatch.setattr(models, "snapshot_download", snapshot_download)
    line = error_of(capsys, ["generate", "hi", "--model", "owner/missing", "--engine", "hf"])
    assert message in line and "owner/missing" in line


def test_a_hub_model_without_safetensors_is_refused(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(models, "snapshot_download", lambda *a, **k: str(tmp_path))
    with pytest.raises(DraftwiseError, match="no safetensors weights; draftwise does not load pickled"):
        models.resolve_model("owner/pickled")


def test_draftwise_no_longer_forces_offline_mode(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "HF_HUB_OFFLINE" not in os.environ


def test_a_local_gguf_file_converts_once_and_feeds_the_llama_engine(tmp_path, monkeypatch):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "cache_dir", lambda: tmp_path / "cache")
    converted = []

    def convert(path, out_dir):
        converted.append(path)
        out_dir.mkdir()
        (out_dir / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    first = models.resolve_model(str(gguf))
    assert models.resolve_model(str(gguf)) == first and converted == [gguf]
    assert first.parent == tmp_path / "cache" / "models" and first.name.startswith("gguf-tiny-")
    assert models.model_gguf(str(gguf)) == gguf
    assert models.model_gguf(str(tmp_path)) is None


def test_an_unreadable_gguf_file_is_a_clear_error(tmp_path, monkeypatch):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not a gguf")
    monkeypatch.setattr(models, "cache_dir", lambda: tmp_path / "cache")
    with pytest.raises(DraftwiseError, match="transformers could not read the GGUF file"):
        models.resolve_model(str(gguf))
