"""Shared fixtures: tiny random llamas for algorithm tests, the real default model for a few end-to-end ones."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from draftwise.decode import GenerationStats, generate_tokens
from draftwise.drafters.base import Drafter, NoDraft
from draftwise.target import TargetModel
from draftwise.verify import Sampling


def tiny_llama(
    vocab_size: int = 96,
    seed: int = 0,
    layers: int = 2,
    dtype=torch.float32,
    max_positions: int = 256,
    peaked: bool = True,
) -> LlamaForCausalLM:
    """A random llama small enough that thousands of forwards take seconds. `peaked` scales the logits up so
    the model is predictable, like a real LM."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(dtype).eval()
    if peaked:
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)
    return model.requires_grad_(False)


def run(
    model,
    drafter: Drafter,
    prompt: list[int],
    max_new_tokens: int = 24,
    sampling: Sampling | None = None,
    seed: int = 0,
    target_class=TargetModel,
    backoff=None,
) -> tuple[list[int], GenerationStats]:
    """Generate with the engine's loop on `target_class` (TargetModel or LeanTarget), with `backoff` (a
    draftwise.backoff.Backoff, or None: always speculate); returns (new tokens, stats)."""
    stats = GenerationStats(method=drafter.name)
    generator = torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    for chunk in generate_tokens(
        target_class(model, drafter.feature_layers),
        drafter,
        prompt,
        max_new_tokens=max_new_tokens,
        sampling=sampling or Sampling(),
        stats=stats,
        generator=generator,
        backoff=backoff,
    ):
        tokens.extend(chunk)
    return tokens, stats


def tiny_eagle(model, draft_vocab: int | None = None, seed: int = 0, **options):
    """An EagleDrafter with a random head over the target's layers 0, 1 and final; a reduced draft vocabulary
    (every other token) exercises the id mapping and q's zeros outside it."""
    from draftwise.draft_head import DraftHead, DraftHeadConfig
    from draftwise.drafters.eagle import EagleDrafter

    torch.manual_seed(seed)
    vocab = model.config.vocab_size
    layers = (0, 1, model.config.num_hidden_layers)
    head = DraftHead(DraftHeadConfig.from_target(model.config, layers, draft_vocab or vocab))
    if draft_vocab:
        head.draft_to_target.copy_(torch.arange(0, 2 * draft_vocab, 2) % vocab)
    head.attach_embedding(model.get_input_embeddings().weight)
    return EagleDrafter(head.eval(), **options)


def greedy_reference(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    return run(model, NoDraft(), prompt, max_new_tokens)[0]


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def real_engine_fp32():
    import draftwise

    return draftwise.load("smollm2-135m", method="pld", dtype="fp32")
