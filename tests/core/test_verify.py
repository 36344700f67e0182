"""Acceptance rules in isolation: greedy picks the longest target-consistent path; sampling keeps p exactly."""

from __future__ import annotations

import pytest
import torch

from draftwise.core.tree import DraftTree
from draftwise.core.verify import (
    Sampling,
    accept_greedy,
    accept_sampling,
    nucleus,
    sample_token,
    target_probs,
    top_two,
)

V = 5


def logits_for(next_tokens: list[int]) -> torch.Tensor:
    """Logits whose argmax at node i is next_tokens[i]."""
    logits = torch.zeros(len(next_tokens), V)
    logits[torch.arange(len(next_tokens)), torch.tensor(next_tokens)] = 5.0
    return logits


def test_greedy_takes_longest_correct_path_and_the_bonus():
    # root(0) -> a:1 -> b:2 ; root -> c:3 -> d:4 -> e:1
    tree = DraftTree(torch.tensor([0, 1, 2, 3, 4, 1]), torch.tensor([-1, 0, 1, 0, 3, 4]), torch.zeros(6))
    # target: after root 3, after c 4, after d 0 (so e:1 is wrong), bonus 0
    path, bonus = accept_greedy(tree, logits_for([3, 0, 0, 4, 0, 0]))
    assert path == [0, 3, 4] and bonus == 0
    path, bonus = accept_greedy(tree, logits_for([2, 0, 0, 0, 0, 0]))  # nothing matches
    assert path == [0] and bonus == 2


def first_token_frequencies(make_tree, probs: torch.Tensor, trials: int = 20000) -> torch.Tensor:
    """How often each token comes out first: the accepted child if any, else the bonus."""
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(V)
    for _ in range(trials):
        tree = make_tree(generator)
        path, bonus = accept_sampling(tree, probs[: tree.size], generator)
        counts[int(tree.tokens[path[1]]) if len(path) > 1 else bonus] += 1
    return counts / trials


def test_sampling_first_token_has_the_target_law():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(4, V) * 1.5, -1)
    q = torch.softmax(torch.randn(V), -1)

    def deterministic(generator):  # three fixed candidates, one of them unlikely under p
        return DraftTree(torch.tensor([0, 1, 3, 4]), torch.tensor([-1, 0, 0, 0]), torch.zeros(4))

    def sampled(generator):  # three i.i.d. candidates from q, verified with min(1, p/q)
        drawn = torch.multinomial(q, 3, replacement=True, generator=generator)
        proposals = torch.stack([torch.nn.functional.one_hot(torch.tensor(0), V).float(), q, q, q])
        return DraftTree(torch.cat([torch.tensor([0]), drawn]), torch.tensor([-1, 0, 0, 0]), torch.zeros(4), proposals)

    for make_tree in (deterministic, sampled):
        tv = (first_token_frequencies(make_tree, probs) - probs[0]).abs().sum() / 2
        assert tv < 0.02  # sampling noise at 20k trials is ~0.006


def test_sample_token_draws_each_token_by_its_weight_and_never_a_zero():
    """Inverse-CDF draws against the weights (unnormalised, zeros at both ends and inside), by total variation."""
    weights = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.5, 0.0, 2.5, 0.0])
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample_token(weights, generator) for _ in range(20000)]), minlength=8)
    assert counts[weights == 0].sum() == 0
    assert (counts / 20000 - weights / weights.sum()).abs().sum() / 2 < 0.02  # noise at 20k draws is ~0.005
    assert all(sample_token(torch.tensor([0.0, 0.0, 1e-30, 0.0]), generator) == 2 for _ in range(100))


def test_sample_token_at_the_top_of_the_unit_interval(monkeypatch):
    """A uniform draw that rounds up to the total still lands on a token with weight, not past the end."""
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.tensor(1.0, dtype=torch.float64))
    assert sample_token(torch.tensor([0.2, 0.7, 0.1, 0.0, 0.0])) == 2


def test_sampling_from_rows_on_demand_reads_only_the_walk_and_matches_the_full_tensor():
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(6, V) * 2, -1)
    tree = DraftTree(torch.tensor([0, 1, 2, 3, 4, 1]), torch.tensor([-1, 0, 1, 0, 3, 4]), torch.zeros(6))
    for seed in range(200):
        asked: list[int] = []

        def rows(node, asked=asked):
            asked.append(node)
            return probs[node]

        on_demand = accept_sampling(tree, rows, torch.Generator().manual_seed(seed))
        assert on_demand == accept_sampling(tree, probs, torch.Generator().manual_seed(seed))
        assert asked == on_demand[0]  # the root, then each accepted node once


def test_target_probs_top_k_top_p_and_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    assert torch.allclose(target_probs(logits, Sampling(1.0)), logits.softmax(-1))
    p = target_probs(logits, Sampling(1.0, top_k=2))
    assert (p[0, 2:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    p = target_probs(logits, Sampling(1.0, top_p=0.5))
    assert p[0, 0] == 1.0  # the top token alone already holds more than half the mass
    p = target_probs(logits, Sampling(0.5))
    assert torch.allclose(p, (logits / 0.5).softmax(-1))


@pytest.mark.parametrize("spread", [0.1, 1.0, 4.0, 12.0])
def test_nucleus_from_the_head_equals_the_nucleus_from_a_full_sort(spread):
    """Top-p over the 256 most likely tokens, with its fallback for flat rows, against sorting the whole row and a
    softmax over the masked scores: the same tokens kept, the same probabilities up to rounding."""
    torch.manual_seed(int(spread * 10))
    scores = torch.randn(6, 49152) * spread
    probs = scores.softmax(-1)
    for top_p in (0.1, 0.5, 0.9, 0.95, 0.999):
        top, order = probs.sort(dim=-1, descending=True)
        dropped = torch.ones_like(scores, dtype=torch.bool).scatter(-1, order, top.cumsum(-1) - top >= top_p)
        full = scores.masked_fill(dropped, -torch.inf).softmax(-1)
        for got, want in ((nucleus(probs, top_p), full), (nucleus(probs[:1], top_p, heads=(4,)), full[:1])):
            assert torch.equal(got > 0, want > 0)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        one = nucleus(probs[0], top_p)  # one row, as sampled drafting passes it
        assert torch.equal(one > 0, full[0] > 0) and torch.isclose(one.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("vocab", [5, 16, 137, 49152])
def test_top_two_is_topk_and_argmax_with_ties_to_the_first(vocab):
    """The kernel's one pass (where it builds) against torch's topk(2) and argmax, ties included."""
    torch.manual_seed(vocab)
    logits = torch.randn(9, vocab)
    logits[0, vocab // 2] = logits[0, vocab - 1] = 50.0  # a tied maximum: index of the first, second value equal
    logits[1] = torch.round(logits[1])  # many ties everywhere
    logits[2] = 0.0
    values, best = top_two(logits)
    assert torch.equal(best, logits.argmax(-1))
    assert torch.equal(values, logits.topk(2, dim=-1).values)
    assert int(best[0]) == vocab // 2 and float(values[0, 1]) == 50.0
