"""The Python API (draftwise.engine): a drafter of one's own runs through Engine.generate like a method does, and
`import draftwise` pulls in none of the optional extras."""

from __future__ import annotations

import subprocess
import sys

import pytest

from draftwise.core.errors import DraftwiseError
from draftwise.drafters import PromptLookup
from draftwise.engine import Engine


class CharTokenizer:
    """Token i is character chr(32 + i): just enough of a tokenizer for an Engine on a tiny model."""

    chat_template = None
    eos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [min(ord(c) - 32, 95) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + i) for i in ids)


def test_a_drafter_of_ones_own_runs_through_generate(tiny_model):
    engine = Engine(tiny_model, CharTokenizer(), model_name="tiny", method="ar")
    prompt = "abcabcabcabc"
    plain = engine.generate(prompt, max_new_tokens=16, chat_template=False)
    own = engine.generate(prompt, drafter=PromptLookup(), max_new_tokens=16, chat_template=False)
    assert own.token_ids == plain.token_ids and own.stats.method == "pld"
    with pytest.raises(DraftwiseError, match="not both"):
        engine.generate(prompt, method="pld", drafter=PromptLookup())


def test_ignore_eos_generates_every_token_asked_for(tiny_model):
    plain = Engine(tiny_model, CharTokenizer(), model_name="tiny", method="pld").generate("abcabc", max_new_tokens=16)
    tokenizer = CharTokenizer()
    tokenizer.eos_token_id = plain.token_ids[2]  # the model's third token now ends the text
    engine = Engine(tiny_model, tokenizer, model_name="tiny", method="pld")
    stopped = engine.generate("abcabc", max_new_tokens=16)
    assert len(stopped.token_ids) <= 3 and stopped.stats.finish_reason == "stop"
    whole = engine.generate("abcabc", max_new_tokens=16, ignore_eos=True)
    assert whole.token_ids == plain.token_ids


def test_import_draftwise_loads_no_optional_extra():
    extras = "fastapi uvicorn prometheus_client starlette pydantic stable_baselines3 gymnasium pyarrow matplotlib"
    code = (
        "import sys, draftwise; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {set((extras + ' llama_cpp').split())!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
