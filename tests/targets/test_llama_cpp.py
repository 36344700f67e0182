"""The llama.cpp engine: tree verification through llama.cpp's multi-sequence KV cache equals decoding each
branch on its own, and speculative decoding on it equals its own plain decoding, adversarial drafters included."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    OracleDrafter,
    RandomDrafter,
)

pytest.importorskip("llama_cpp", reason="the llama engine needs `pip install 'draftwise[llama]'`")


from draftwise.core.decode import GenerationStats, generate_tokens  # noqa: E402
from draftwise.core.drafter import NoDraft  # noqa: E402
from draftwise.core.tree import DraftTree  # noqa: E402
from draftwise.core.verify import Sampling  # noqa: E402
from draftwise.drafters.pld import PromptLookup  # noqa: E402
from draftwise.targets.load import llama_parts  # noqa: E402

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def llama():
    tokenizer, target = llama_parts("smollm2-135m")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}],
        add_generation_prompt=True,
        tokenize=True,
    )
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    return target, prompt


def generate(target, drafter, prompt: list[int], max_new_tokens: int = 48) -> tuple[list[int], GenerationStats]:
    stats = GenerationStats(method=drafter.name)
    tokens: list[int] = []
    for chunk in generate_tokens(
        target, drafter, prompt, max_new_tokens=max_new_tokens, sampling=Sampling(), stats=stats
    ):
        tokens.extend(chunk)
    return tokens, stats


def branch_logits(target, prompt: list[int], branch: list[int]) -> torch.Tensor:
    """Logits after each token of `branch` (root first), decoded as a plain chain on a fresh cache."""
    target.prefill(torch.tensor(prompt[:-1]))
    chain = DraftTree(torch.tensor(branch), torch.arange(-1, len(branch) - 1), torch.zeros(len(branch)))
    return target.forward_tree(chain).logits


def test_tree_logits_equal_each_branch_decoded_alone(llama):
    target, prompt = llama
    root = prompt[-1]
    # Three branches sharing prefixes: root-a-b-c, root-a-d, root-e
    tokens = torch.tensor([root, 100, 200, 300, 400, 500])
    parents = torch.tensor([-1, 0, 1, 2, 1, 0])
    tree = DraftTree(tokens, parents, torch.zeros(6))
    target.prefill(torch.tensor(prompt[:-1]))
    tree_logits = target.forward_tree(tree).logits
    for path in tree.paths():
        alone = branch_logits(target, prompt, tokens[path].tolist())
        torch.testing.assert_close(tree_logits[path], alone, atol=2e-2, rtol=1e-3)
        assert (tree_logits[path].argmax(-1) == alone.argmax(-1)).all()


def test_commit_keeps_the_accepted_branch_only(llama):
    """After accepting a path off the first branch, the cache must equal one that decoded that path alone."""
    target, prompt = llama
    root = prompt[-1]
    tree = DraftTree(torch.tensor([root, 100, 200, 300]), torch.tensor([-1, 0, 0, 2]), torch.zeros(4))
    target.prefill(torch.tensor(prompt[:-1]))
    past = target.length
    target.forward_tree(tree)
    target.commit(past, [0, 2, 3])
    assert target.length == past + 3
    after = target.forward_tree(DraftTree.root_only(7)).logits[0]
    expected = branch_logits(target, prompt, [root, 200, 300, 7])[-1]
    torch.testing.assert_close(after, expected, atol=2e-2, rtol=1e-3)


@pytest.mark.parametrize(
    "make_drafter",
    [
        lambda prompt, truth: PromptLookup(),
        lambda prompt, truth: RandomDrafter(49152, nodes=12),
        lambda prompt, truth: OracleDrafter(prompt, truth, 49152, depth=6, width=3, error_rate=0.3),
    ],
    ids=["pld", "random", "oracle-wide-noisy"],
)
def test_speculative_equals_plain_decoding_on_llama_cpp(llama, make_drafter):
    target, prompt = llama
    plain, _ = generate(target, NoDraft(), prompt)
    tokens, stats = generate(target, make_drafter(prompt, plain), prompt)
    assert tokens == plain
    assert stats.rounds <= len(plain)


def test_flushing_parked_nodes_keeps_the_output(llama, monkeypatch):
    """Rebuilding the cache once rejected nodes pile up (here after every few) changes nothing."""
    import draftwise.targets.llama_cpp as llama_target

    target, prompt = llama
    plain, _ = generate(target, NoDraft(), prompt, max_new_tokens=32)
    monkeypatch.setattr(llama_target, "MAX_PARKED", 3)
    drafter = OracleDrafter(prompt, plain, 49152, depth=5, width=3, error_rate=0.3, seed=1)
    assert generate(target, drafter, prompt, max_new_tokens=32)[0] == plain


def test_models_load_without_the_amx_repack_on_amx_cpus():
    """llama.cpp's AMX weight repack segfaults on AMX Xeons: there every model loads without extra buffer types,
    and wrapping the defaults twice wraps them once."""
    import llama_cpp

    from draftwise.targets.llama_cpp import _without_amx_repack

    _without_amx_repack(llama_cpp)
    wrapped = llama_cpp.llama_cpp.llama_model_default_params
    _without_amx_repack(llama_cpp)
    assert llama_cpp.llama_cpp.llama_model_default_params is wrapped is llama_cpp.llama_model_default_params
    assert wrapped().use_extra_bufts is False
