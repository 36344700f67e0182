"""End-to-end checks on the embedded SmolLM2-135M (downloaded and converted on first use)."""

from __future__ import annotations

import json

import pytest

import draftwise
from draftwise.cli import main
from draftwise.core.verify import NEAR_TIE_EPSILON, compare_greedy

pytestmark = pytest.mark.real_model

SUMMARIZE = (
    "Summarize in two sentences: The city council met on Tuesday to discuss the new park. The new park "
    "will have a playground, a pond and a garden. The council voted to fund the park with a budget of two "
    "million dollars. Construction of the park starts in May and the park opens next spring."
)
PROMPTS = [
    SUMMARIZE,
    "Write a Python function that returns the n-th Fibonacci number.",
    "What is the capital of France?",
]


def test_fp32_greedy_is_identical_for_every_method(real_engine_fp32):
    for prompt in PROMPTS[:2]:
        reference = real_engine_fp32.generate(prompt, method="ar", max_new_tokens=40)
        for method in ("pld", "draft-model"):
            out = real_engine_fp32.generate(prompt, method=method, max_new_tokens=40)
            assert out.token_ids == reference.token_ids, f"{method} differs from ar on {prompt[:30]!r}"
            assert out.text == reference.text


def test_draft_model_with_the_target_weights_is_accepted_in_full(real_engine_fp32):
    out = real_engine_fp32.generate(PROMPTS[1], method="draft-model", max_new_tokens=32)
    assert out.stats.mean_accepted > 4.0


def test_bf16_differences_are_only_near_ties():
    engine = draftwise.load("smollm2-135m", method="pld", dtype="bf16")
    for prompt in PROMPTS[:2]:
        reference = engine.generate(prompt, method="ar", max_new_tokens=24)
        out = engine.generate(prompt, method="pld", max_new_tokens=24)
        verdict = compare_greedy(reference.token_ids, reference.stats.margins, out.token_ids, NEAR_TIE_EPSILON["bf16"])
        assert verdict in ("identical", "near_tie")


def test_stream_pieces_add_up_to_the_text(real_engine_fp32):
    stream = real_engine_fp32.stream(SUMMARIZE, max_new_tokens=40)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == stream.generation.text


def test_cli_json_pld_equals_ar(capsys):
    outputs = {}
    for method in ("ar", "pld"):
        assert (
            main(["generate", SUMMARIZE, "--json", "--dtype", "fp32", "--method", method, "--max-new-tokens", "32"])
            == 0
        )
        outputs[method] = json.loads(capsys.readouterr().out)
    for key in (
        "text",
        "new_tokens",
        "wall_s",
        "tokens_per_s",
        "rounds",
        "mean_accepted",
        "draft_calls",
        "verified_tokens",
        "method",
        "model",
    ):
        assert key in outputs["pld"], key
    assert outputs["pld"]["text"] == outputs["ar"]["text"]
    assert outputs["pld"]["mean_accepted"] > 1.5  # summarisation copies from the prompt
