"""The decode loop (draftwise.core.decode) is lossless on tiny random llamas: greedy output equals plain decoding
for every drafter, adversarial ones included; sampled output has the target's distribution; the KV cache after
a commit equals plain decoding's."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    OracleDrafter,
    RandomDrafter,
    greedy_reference,
    run,
    tiny_eagle,
    tiny_llama,
)
from scipy.stats import chisquare

from draftwise.core.backoff import ForcedBackoff
from draftwise.core.drafter import Drafter, NoDraft
from draftwise.core.tree import DraftTree
from draftwise.core.verify import Sampling
from draftwise.drafters.draft_model import DraftModel
from draftwise.drafters.pld import PromptLookup, PromptLookupRetriever
from draftwise.drafters.rasd import FittedGate, RasdDrafter
from draftwise.drafters.retrieval import Retrieved
from draftwise.targets.hf import HFTarget
from draftwise.targets.lean.model import LeanTarget


class OracleRetriever:
    """A retrieval source that knows the true continuation, with one wrong sibling branch."""

    def __init__(self, prompt: list[int], truth: list[int]):
        self.full = prompt + truth

    def retrieve(self, tokens: torch.Tensor, budget: int) -> Retrieved | None:
        pos = tokens.numel()
        right = self.full[pos : pos + 8]
        if not right:
            return None
        wrong = [(right[0] + 1) % 96, *right[1:]]
        return Retrieved(DraftTree.from_sequences(int(tokens[-1]), [right, wrong]).select_top(budget), match=1)


PROMPTS = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3], [42] * 6, list(range(30, 70))]


def drafters_for(model, prompt: list[int], truth: list[int]) -> list[Drafter]:
    vocab = model.config.vocab_size
    return [
        PromptLookup(),
        PromptLookup(max_ngram=1, num_pred_tokens=20, max_matches=8, total_tokens=64),
        RandomDrafter(vocab),
        OracleDrafter(prompt, truth, vocab, depth=12),  # exact continuation
        OracleDrafter(prompt, truth, vocab, depth=24, error_rate=0.15),  # deep and narrow
        OracleDrafter(prompt, truth, vocab, depth=2, width=16),  # wide and shallow
        OracleDrafter(prompt, truth, vocab, depth=6, width=3, error_rate=0.3),
        DraftModel(tiny_llama(vocab, seed=7), top_k=3, depth=3, total_tokens=12),  # a different model
        DraftModel(model, top_k=2, depth=5, total_tokens=10),  # the same model: accepts almost everything
        tiny_eagle(model, top_k=3, depth=4, total_tokens=12),  # an untrained draft head
        tiny_eagle(model, draft_vocab=40, top_k=1, depth=6, total_tokens=8),  # chain, reduced vocabulary
        RasdDrafter(tiny_eagle(model).head, [PromptLookupRetriever()], top_k=2, depth=2, total_tokens=6),
        RasdDrafter(  # serial retrieval, every branch kept, an oracle's tree as a second retrieval source
            tiny_eagle(model).head,
            [PromptLookupRetriever(), OracleRetriever(prompt, truth)],
            concurrent=False,
            gate=FittedGate(threshold=0.0),
            top_k=2,
            depth=1,
            total_tokens=4,
        ),
    ]


@pytest.mark.parametrize("target_class", [HFTarget, LeanTarget], ids=["hf", "lean"])
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("max_new_tokens", [1, 7, 40])
def test_greedy_output_equals_plain_decoding_for_every_drafter(tiny_model, prompt, max_new_tokens, target_class):
    """Against transformers' own plain decoding, on either engine."""
    truth = greedy_reference(tiny_model, prompt, max_new_tokens + 30)
    reference = truth[:max_new_tokens]
    for drafter in drafters_for(tiny_model, prompt, truth):
        out, stats = run(tiny_model, drafter, prompt, max_new_tokens, target_class=target_class)
        assert out == reference, f"{drafter.name} diverged from plain decoding"
        assert stats.new_tokens == max_new_tokens
        assert sum(stats.accepted) >= max_new_tokens


@pytest.mark.parametrize("target_class", [HFTarget, LeanTarget], ids=["hf", "lean"])
@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_greedy_output_equals_plain_decoding_with_backoff_switching_often(tiny_model, prompt, target_class):
    """Every drafter, with half its rounds (at random) verifying the root alone without asking it: a drafter that
    keeps state per committed token (a draft head's cache, a draft model's) stays in step."""
    truth = greedy_reference(tiny_model, prompt, 70)
    for i, drafter in enumerate(drafters_for(tiny_model, prompt, truth)):
        backoff = ForcedBackoff(plain_share=0.5, seed=i)
        out, stats = run(tiny_model, drafter, prompt, 40, target_class=target_class, backoff=backoff)
        assert out == truth[:40], f"{drafter.name} diverged from plain decoding under back-off"
        assert 0 < stats.plain_rounds < stats.rounds


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-6])
def test_a_tiny_temperature_is_greedy_for_every_drafter(tiny_model, temperature):
    """logits / 1e-300 overflows to NaN, and a NaN acceptance ratio accepted every draft token: below the floor
    sampling is greedy decoding, whatever the drafter."""
    prompt = PROMPTS[1]
    truth = greedy_reference(tiny_model, prompt, 40)
    sampling = Sampling(temperature, top_p=0.9, top_k=5)
    assert sampling.greedy
    for drafter in drafters_for(tiny_model, prompt, truth):
        out, _ = run(tiny_model, drafter, prompt, 24, sampling=sampling, seed=3)
        assert out == truth[:24], f"{drafter.name} at T={temperature:g} is not greedy decoding"


def test_oracle_is_accepted_in_full_and_random_mostly_rejected(tiny_model):
    prompt = PROMPTS[0]
    truth = greedy_reference(tiny_model, prompt, 60)
    _, oracle = run(tiny_model, OracleDrafter(prompt, truth, 96, depth=9), prompt, 40)
    assert oracle.mean_accepted == pytest.approx(10.0, abs=0.5)
    _, rand = run(tiny_model, RandomDrafter(96), prompt, 40)
    assert rand.mean_accepted < 1.5


def test_plain_loop_matches_transformers_generate(tiny_model):
    prompt = PROMPTS[1]
    ours = greedy_reference(tiny_model, prompt, 30)
    hf = tiny_model.generate(
        torch.tensor([prompt]), max_new_tokens=30, do_sample=False, min_new_tokens=30, pad_token_id=0
    )
    assert ours == hf[0, len(prompt) :].tolist()


def test_cache_after_commit_equals_plain_decoding(tiny_model):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    target = HFTarget(tiny_model)
    target.prefill(torch.tensor(prompt[:-1]))
    past = target.length
    # root, then two branches; accept the second branch (non-contiguous node indices 0, 2, 4)
    tree = DraftTree(torch.tensor([prompt[-1], 11, 12, 13, 14]), torch.tensor([-1, 0, 0, 1, 2]), torch.zeros(5))
    out = target.forward_tree(tree)
    target.commit(past, [0, 2, 4])
    plain = HFTarget(tiny_model)
    plain.prefill(torch.tensor(prompt + [12, 14]))
    assert target.length == plain.length
    for ours, ref in zip(target.cache.layers, plain.cache.layers, strict=True):
        torch.testing.assert_close(ours.keys, ref.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.values, ref.values, atol=1e-5, rtol=1e-5)
    # the tree forward's logits at node 4 equal plain decoding's next-token logits there
    nxt = plain.forward_tree(DraftTree.root_only(7))
    ref_logits = HFTarget(tiny_model)
    ref_logits.prefill(torch.tensor(prompt + [12]))
    torch.testing.assert_close(
        out.logits[4], ref_logits.forward_tree(DraftTree.root_only(14)).logits[0], atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(target.forward_tree(DraftTree.root_only(7)).logits, nxt.logits, atol=1e-4, rtol=1e-4)


SAMPLING_CASES = [Sampling(1.0), Sampling(0.7, top_k=5), Sampling(1.3, top_p=0.8)]


def exact_two_token_law(model, prompt: list[int], sampling: Sampling) -> torch.Tensor:
    """P(first two new tokens) under plain sampling, by enumeration over the (small) vocabulary."""
    from draftwise.core.verify import target_probs

    vocab = model.config.vocab_size
    with torch.no_grad():
        first = target_probs(model(torch.tensor([prompt])).logits[0, -1], sampling)
        contexts = torch.tensor([prompt + [t] for t in range(vocab)])
        second = target_probs(model(contexts).logits[:, -1], sampling)
    return (first[:, None] * second).flatten()


SAMPLING_MAKERS = {
    "ar": lambda prompt, vocab: NoDraft(),
    "wide": lambda prompt, vocab: OracleDrafter(prompt, [1, 2, 3] * 4, vocab, depth=2, width=4),
    "random": lambda prompt, vocab: RandomDrafter(vocab, nodes=6),
    "draft-model": lambda prompt, vocab: DraftModel(tiny_llama(vocab, seed=9), top_k=2, depth=2, total_tokens=6),
    "pld": lambda prompt, vocab: PromptLookup(),
    "eagle": lambda prompt, vocab: tiny_eagle(tiny_llama(vocab, seed=3), draft_vocab=5, depth=2),
    "rasd": lambda prompt, vocab: RasdDrafter(
        tiny_eagle(tiny_llama(vocab, seed=3)).head, [PromptLookupRetriever()], gate=FittedGate(threshold=0.0), depth=1
    ),
}


CASES = [(SAMPLING_CASES[0], name) for name in SAMPLING_MAKERS] + [
    (sampling, name) for sampling in SAMPLING_CASES[1:] for name in ("wide", "draft-model", "eagle")
]


LEAN_CASES = [(SAMPLING_CASES[0], "wide", "lean"), (SAMPLING_CASES[1], "eagle", "lean")]
# every drafter again with the back-off forced to switch often (ar has nothing to back off from)
BACKOFF_CASES = [(SAMPLING_CASES[0], name, "hf") for name in SAMPLING_MAKERS if name != "ar"] + [
    (SAMPLING_CASES[2], "eagle", "hf"),
    LEAN_CASES[1],
]


@pytest.mark.parametrize(
    ("sampling", "name", "engine", "backoff"),
    [(s, n, "hf", "speculate") for s, n in CASES]
    + [(*case, "speculate") for case in LEAN_CASES]
    + [(*case, "forced-backoff") for case in BACKOFF_CASES],
    ids=lambda v: str(v),
)
def test_sampling_preserves_the_target_distribution(sampling, name, engine, backoff):
    """Chi-square goodness of fit of the first two sampled tokens against the exact law (p > 1e-4); with a
    forced back-off, each round verifies the root alone with probability 1/2, drawn apart from the sampling
    generator."""
    vocab, trials = 8, 1200
    model = tiny_llama(vocab, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.25)  # spread the mass so many outcomes are exercised
    prompt = [1, 2, 3, 1, 2]
    law = exact_two_token_law(model, prompt, sampling)
    drafter = SAMPLING_MAKERS[name](prompt, vocab)
    lean = LeanTarget(model, drafter.feature_layers) if engine == "lean" else None  # one, reset by each prefill
    target_class = HFTarget if lean is None else (lambda *_: lean)
    counts = torch.zeros(vocab * vocab)
    for seed in range(trials):
        forced = ForcedBackoff(plain_share=0.5, seed=trials + seed) if backoff == "forced-backoff" else None
        out, _ = run(model, drafter, prompt, 2, sampling, seed, target_class, backoff=forced)
        counts[out[0] * vocab + out[1]] += 1
    support = law > 0
    assert counts[~support].sum() == 0, f"{name}: sampled a token outside the target's support"
    expected = law[support] * trials
    # merge rare cells so the chi-square approximation holds (expected >= 5)
    observed = counts[support]
    rare = expected < 5
    obs = torch.cat([observed[~rare], observed[rare].sum().view(1)]).numpy()
    exp = torch.cat([expected[~rare], expected[rare].sum().view(1)]).numpy()
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    p_value = chisquare(obs, exp * obs.sum() / exp.sum()).pvalue
    assert p_value > 1e-4, f"{name}: sampled distribution differs from the target (p={p_value:.2g})"


def test_fitted_gate_learns_which_head_probabilities_pay():
    gate = FittedGate(min_gain=0.3, prior_rounds=2.0)
    low, high = torch.tensor([0.002]), torch.tensor([0.6])
    assert gate.keep(low).item() and gate.keep(high).item()  # optimistic before any evidence
    for _ in range(40):
        gate.record(low, torch.tensor([0.0]))  # branches the head found unlikely never added tokens
        gate.record(high, torch.tensor([3.0]))
    assert not gate.keep(low).item() and gate.keep(high).item()
    assert FittedGate(threshold=0.1).keep(torch.tensor([0.05, 0.2])).tolist() == [False, True]
