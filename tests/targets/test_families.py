"""The lean engine on each llama-like family it maps (Llama with biases, Qwen2 q/k/v biases, Qwen3 per-head q/k
norms, Mistral's sliding window): logits equal transformers' in fp32 for a prefill and a tree, and speculative
decoding equals plain decoding; other families fall back to transformers under `--engine auto`."""

from __future__ import annotations

import pytest
import torch
from conftest import OracleDrafter, RandomDrafter, run, tiny_eagle
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from draftwise.core.drafter import NoDraft
from draftwise.core.errors import DraftwiseError
from draftwise.core.tree import DraftTree
from draftwise.drafters.pld import PromptLookup
from draftwise.targets.lean.model import LeanTarget, lean_supported, sliding_windows
from draftwise.targets.load import load_target

VOCAB = 96
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
FAMILIES = {
    "llama-bias": lambda: LlamaConfig(**SIZES, attention_bias=True),
    "qwen2": lambda: Qwen2Config(**SIZES),
    # a window shorter than the prompt on the last two layers: the windowed layers mask by position
    "qwen2-window": lambda: Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=6, max_window_layers=1),
    "qwen3": lambda: Qwen3Config(**SIZES, head_dim=16),
    "mistral": lambda: MistralConfig(**SIZES, sliding_window=8),
}


def family_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[name](), dtype=torch.float32).eval()
    with torch.no_grad():
        for module_name, param in model.named_parameters():
            if module_name.endswith("bias") or "norm" in module_name:  # random biases and norms, not zeros and ones
                param.add_(torch.randn_like(param) * 0.5)
        model.lm_head.weight.mul_(8.0)  # peaked, like a real LM
    return model.requires_grad_(False)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param, family_model(request.param)


def path_logits(model, prefix: list[int], tree: DraftTree) -> torch.Tensor:
    """Each tree node's logits from a plain causal forward over the prefix and the node's ancestors."""
    parents = tree.parents.tolist()
    rows = []
    for node in range(tree.size):
        path, i = [], node
        while i >= 0:
            path.append(int(tree.tokens[i]))
            i = parents[i]
        ids = torch.tensor(prefix + path[::-1])[None]
        rows.append(model(input_ids=ids).logits[0, -1])
    return torch.stack(rows)


def test_lean_matches_transformers_on_each_family(family):
    name, model = family
    assert lean_supported(model)
    lean = LeanTarget(model, (0, 3))
    assert lean.windowed == (name in ("qwen2-window", "mistral"))
    features = lean.prefill(torch.tensor(PROMPT))
    with torch.no_grad():
        out = model(input_ids=torch.tensor(PROMPT)[None], output_hidden_states=True)
    torch.testing.assert_close(features[:, 0], out.hidden_states[0][0])
    torch.testing.assert_close(features[:, 1], out.hidden_states[3][0], atol=1e-4, rtol=1e-4)
    tree = DraftTree(torch.tensor([7, 11, 12, 13, 14, 15]), torch.tensor([-1, 0, 0, 1, 2, 2]), torch.zeros(6))
    with torch.no_grad():
        reference = path_logits(model, PROMPT, tree)
    torch.testing.assert_close(lean.forward_tree(tree).logits, reference, atol=1e-4, rtol=1e-4)
    lean.commit(len(PROMPT), [0, 2, 5])  # keep 7 -> 12 -> 15; the next step sees a compacted cache
    with torch.no_grad():
        reference = model(input_ids=torch.tensor(PROMPT + [7, 12, 15, 9])[None]).logits[0, -1]
    torch.testing.assert_close(lean.forward_tree(DraftTree.root_only(9)).logits[0], reference, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def plain_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding by full causal forwards (no cache, no EOS): the reference for the windowed families."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(input_ids=torch.tensor(ids)[None]).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def lean_target(model, layers=()):
    return LeanTarget(model, layers)


def test_speculation_on_each_family_is_lossless(family):
    name, model = family
    reference, _ = run(model, NoDraft(), PROMPT, 30, target_class=lean_target)
    assert reference == plain_greedy(model, PROMPT, 30)
    truth = reference + [0] * 10
    drafters = [
        RandomDrafter(VOCAB, nodes=12),
        OracleDrafter(PROMPT, truth, VOCAB, depth=6, width=3, error_rate=0.2),
        PromptLookup(),
        tiny_eagle(model),
    ]
    for drafter in drafters:
        out, _ = run(model, drafter, PROMPT, 30, target_class=lean_target)
        assert out == reference, f"{drafter.name} diverged from plain decoding on {name}"


def test_windows_follow_the_config():
    assert sliding_windows(MistralConfig(**SIZES, sliding_window=8)) == [8, 8, 8]
    assert sliding_windows(MistralConfig(**SIZES, sliding_window=None)) == [None] * 3
    qwen = Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=6, max_window_layers=1)
    assert sliding_windows(qwen) == [None, 6, 6]
    assert sliding_windows(Qwen2Config(**SIZES)) == [None] * 3
    # a window as long as the context never binds: the plain path (and its kernels) stays
    assert not LeanTarget(family_model("qwen2")).windowed


def test_auto_falls_back_to_transformers_for_other_families(tmp_path, capsys, monkeypatch):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert not lean_supported(gpt2)
    monkeypatch.setattr("draftwise.targets.load.load_model", lambda *a, **k: (gpt2, None))
    _, _, target = load_target("tiny-gpt2", engine="auto", dtype="fp32")
    assert target.backend == "hf"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["[draftwise] the lean engine does not run gpt2 models: using transformers"]
    with pytest.raises(DraftwiseError, match="runs llama, mistral, qwen2, qwen3 models; .tiny-gpt2. is gpt2"):
        load_target("tiny-gpt2", engine="lean", dtype="fp32")
