"""Shared fixtures and helpers: tiny random llamas for algorithm tests, the real default model for a few end-to-end
ones, adversarial drafters, a synthetic round log and its cost model, and the CLI's one-error-line check.

Tests mirror the package: tests/core/ tests draftwise.core, tests/policies/learn/ tests draftwise.policies.learn,
and so on; helpers that several of them use live here."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from draftwise.cli import main
from draftwise.core.decode import GenerationStats, generate_tokens
from draftwise.core.drafter import DraftContext, Drafter, NoDraft
from draftwise.core.tree import DraftTree
from draftwise.core.verify import Sampling
from draftwise.drafters.dynamic_tree import candidate_tree
from draftwise.drafters.tree_policy import TreePolicy
from draftwise.engine import Engine
from draftwise.policies.cost import CostModel, PiecewiseLinear
from draftwise.policies.learn.offline import RoundSet
from draftwise.targets.hf import HFTarget
from draftwise.targets.models import resolve_model


def pytest_configure(config):
    # registered here rather than in pyproject.toml; benchmarks/gpu_check.sh runs `-m cuda`
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA device (skipped without one; run by benchmarks/gpu_check.sh)"
    )


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
    target_class=HFTarget,
    backoff=None,
) -> tuple[list[int], GenerationStats]:
    """Generate with the engine's loop on `target_class` (HFTarget or LeanTarget), with `backoff` (a
    draftwise.core.backoff.Backoff, or None: always speculate); returns (new tokens, stats)."""
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
    from draftwise.drafters.eagle import EagleDrafter
    from draftwise.heads.model import DraftHead, DraftHeadConfig

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


# --- drafters that test losslessness: random trees, and an oracle that knows the continuation -------------------


class RandomDrafter(Drafter):
    """Random tokens in a random tree: nearly everything is rejected."""

    name = "random"

    def __init__(self, vocab: int, nodes: int = 12, seed: int = 0):
        super().__init__()
        self.vocab, self.nodes, self.gen = vocab, nodes, torch.Generator().manual_seed(seed)

    def propose(self, context: DraftContext) -> DraftTree:
        n = min(self.nodes, context.budget)
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=self.gen)) for i in range(1, n)]
        tokens = torch.randint(0, self.vocab, (n,), generator=self.gen)
        tokens[0] = context.tokens[-1]
        return DraftTree(tokens, torch.tensor(parents), torch.zeros(n))


class OracleDrafter(Drafter):
    """Knows the true continuation; `error_rate` corrupts tokens, `width` adds wrong siblings at every level
    (the true one at a random rank), `depth` sets the chain length: deep-narrow and wide-shallow adversaries."""

    name = "oracle"

    def __init__(
        self,
        prompt: list[int],
        truth: list[int],
        vocab: int,
        depth: int = 8,
        width: int = 1,
        error_rate: float = 0.0,
        seed: int = 0,
    ):
        super().__init__()
        self.full = prompt + truth
        self.vocab, self.depth, self.width, self.error_rate = vocab, depth, width, error_rate
        self.gen = torch.Generator().manual_seed(seed)

    def propose(self, context: DraftContext) -> DraftTree:
        pos = context.tokens.numel()
        tokens, parents, parent = [int(context.tokens[-1])], [-1], 0
        for step in range(self.depth):
            true_next = self.full[pos + step] if pos + step < len(self.full) else 0
            if torch.rand((), generator=self.gen) < self.error_rate:
                true_next = (true_next + 1) % self.vocab
            wrong = [(true_next + k) % self.vocab for k in range(1, self.width)]
            order = wrong[:]
            order.insert(int(torch.randint(0, self.width, (1,), generator=self.gen)), true_next)
            for tok in order:
                if len(tokens) >= context.budget:
                    break
                tokens.append(tok)
                parents.append(parent)
                if tok == true_next:
                    chosen = len(tokens) - 1
            if len(tokens) >= context.budget:
                break
            parent = chosen
        return DraftTree(torch.tensor(tokens), torch.tensor(parents), torch.zeros(len(tokens)))


# --- tree policies: their trees' shape, a synthetic round log, a cost model, a drafter with policy hooks ---------

TOP_K, DEPTH = 3, 4


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and much faster than on two when another job holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cost_model() -> CostModel:
    """This CPU's shape: a 1-token verify is cheap, 2+ tokens cost about twice as much, then a slow climb."""
    verify = PiecewiseLinear([1, 2, 4, 8, 16, 32], [66, 124, 155, 160, 173, 231], [20, 25, 30, 30, 35, 40])
    return CostModel(PiecewiseLinear([1, 16], [4.0, 5.0], [1.0, 1.0]), verify, 10.0)


class ModelTreeDrafter(Drafter):
    """EAGLE-2 trees drafted by a small causal LM (a noisy copy of the target, so some drafts are accepted and
    some not), with the same policy hooks as EagleDrafter."""

    name = "model-tree"

    def __init__(self, model, top_k: int, depth: int):
        super().__init__()
        self.model, self.top_k, self.depth, self.policy = model, top_k, depth, TreePolicy()

    @torch.no_grad()
    def _logprobs(self, sequences: list[list[int]]) -> torch.Tensor:
        self.draft_calls += 1
        return self.model(torch.tensor(sequences)).logits[:, -1].float().log_softmax(-1)

    def propose(self, context):
        tokens = context.tokens.tolist()
        token_of = {0: tokens[-1]}

        def step(frontier, frontier_tokens, parents):
            token_of.update(zip(frontier.tolist(), frontier_tokens.tolist(), strict=True))
            sequences = []
            for node in frontier.tolist():
                path = []
                while node > 0:
                    path.append(token_of[node])
                    node = int(parents[node])
                sequences.append(tokens + path[::-1])
            return self._logprobs(sequences)

        keep_going = self.policy.begin_round(len(tokens) - 1)
        root_lp = self._logprobs([tokens])[0]
        candidates = candidate_tree(tokens[-1], root_lp, step, self.top_k, self.depth, None, keep_going)
        return candidates.select_top(max(1, min(context.budget, self.policy.verify_size(candidates, context.budget))))


def noisy_copy(model, scale: float, seed: int = 0):
    draft = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale * p.std())
    return draft


def synthetic_rounds(n: int = 600, seed: int = 0, top_k: int = 4, depth: int = 4) -> RoundSet:
    """Half the rounds are easy (a confident frontier; every drafted level is accepted), half hopeless (a flat,
    unlikely frontier; nothing is accepted): drafting deep pays on the first and is waste on the second."""
    rng = np.random.default_rng(seed)
    sizes = (1, 2, 4, 8, 16)
    easy = rng.random(n) < 0.5
    k = top_k
    scores = np.zeros((n, k + depth * k * k), dtype=np.float32)
    best = np.where(easy, -0.05, -2.5) + rng.normal(0, 0.02, n)
    scores[:, :k] = best[:, None] - np.arange(k) * np.where(easy, 2.0, 0.3)[:, None]
    for c in range(1, depth + 1):
        best = best + np.where(easy, -0.05, -1.5)
        start = k + (c - 1) * k * k
        scores[:, start : start + k * k] = best[:, None] - np.arange(k * k) * np.where(easy, 1.0, 0.1)[:, None]
    calls = np.arange(depth + 1)[None, :, None]
    v = np.asarray(sizes)[None, None, :]
    size = np.minimum(v, 1 + k + calls * k * k).repeat(n, 0)
    tree_depth = np.minimum(calls + 1, size - 1)
    accepted = np.where(easy[:, None, None], tree_depth, 0)
    q = np.where(easy, 0.9, 0.05)[:, None, None, None]
    d = np.arange(depth + 2)[None, None, None, :]
    reach = np.where(d <= tree_depth[..., None], q**d, 0.0)
    return RoundSet(
        prompt_id=np.arange(n) // 10,
        context=rng.integers(100, 600, n),
        last_accepted=rng.integers(1, 4, n),
        level_scores=scores,
        accepted=accepted.astype(np.int16),
        size=size.astype(np.int16),
        tree_depth=tree_depth.astype(np.int16),
        reach=reach.astype(np.float32),
        top_k=k,
        depth=depth,
        sizes=sizes,
    )


# --- the command line --------------------------------------------------------------------------------------------


def error_of(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@contextmanager
def tiny_engine() -> Iterator[Engine]:
    """A `pld` engine on a tiny random Llama behind the real SmolLM2 tokenizer (the server tests' engine), on one
    torch thread: at width 64 more threads only add sync cost, the more so on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny_llama(49152, max_positions=512, peaked=False)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    try:
        yield Engine(model, tokenizer, model_name="tiny", method="pld")
    finally:
        torch.set_num_threads(threads)
