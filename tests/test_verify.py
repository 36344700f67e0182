"""Acceptance rules in isolation: greedy picks the longest target-consistent path; sampling keeps p exactly."""

from __future__ import annotations

import torch

from draftwise.tree import DraftTree
from draftwise.verify import Sampling, accept_greedy, accept_sampling, target_probs

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


def empirical(draw, trials: int) -> torch.Tensor:
    counts = torch.zeros(V * V)
    for _ in range(trials):
        counts[draw()] += 1
    return counts / trials


def test_sampling_preserves_two_token_distribution_with_deterministic_and_sampled_drafts():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(4, V) * 1.5, -1)  # rows: root, children...
    # root -> {1, 3} deterministic; 1 -> {4}
    det = DraftTree(torch.tensor([0, 1, 3, 4]), torch.tensor([-1, 0, 0, 1]), torch.zeros(4))
    q = torch.softmax(torch.randn(4, V), -1)
    generator = torch.Generator().manual_seed(1)

    def draw_sampled_chain():  # root -> x1 ~ q0 -> x2 ~ q1, tokens drawn fresh each time
        x1 = int(torch.multinomial(q[0], 1, generator=generator))
        x2 = int(torch.multinomial(q[1], 1, generator=generator))
        proposals = torch.stack([torch.nn.functional.one_hot(torch.tensor(0), V).float(), q[0], q[1]])
        return DraftTree(torch.tensor([0, x1, x2]), torch.tensor([-1, 0, 1]), torch.zeros(3), proposals)

    # exact target: first token ~ p(root); second ~ p(row of the node holding the first token), which the
    # test builds so that the second-step distribution depends on the first token.
    def second_row(tree: DraftTree, first: int) -> torch.Tensor:
        for i in range(1, tree.size):
            if tree.parents[i] == 0 and int(tree.tokens[i]) == first:
                return probs[i] if i < 4 else probs[1]
        return probs[3]

    for make_tree in (lambda: det, draw_sampled_chain):
        def draw():
            tree = make_tree()
            rows = torch.stack([probs[min(i, 3)] for i in range(tree.size)])
            path, bonus = accept_sampling(tree, rows, generator)
            out = [int(tree.tokens[i]) for i in path[1:]] + [bonus]
            if len(out) < 2:  # only one token this round: the next comes from the row after it
                nxt = int(torch.multinomial(second_row(tree, out[0]), 1, generator=generator))
                out.append(nxt)
            return out[0] * V + out[1]

        # the exact law of (first, second) under this construction, computed by enumeration
        tree0 = make_tree()
        exact = torch.zeros(V * V)
        rows0 = torch.stack([probs[min(i, 3)] for i in range(tree0.size)])
        for first in range(V):
            child = next((i for i in range(1, tree0.size) if tree0.parents[i] == 0 and int(tree0.tokens[i]) == first),
                         None)
            second = rows0[child] if child is not None else second_row(tree0, first)
            exact[first * V: first * V + V] = probs[0][first] * second
        if tree0.proposals is not None:  # sampled trees change every draw; only the first token law is fixed
            first_emp = empirical(draw, 6000).view(V, V).sum(1)
            assert (first_emp - probs[0]).abs().sum() / 2 < 0.03
        else:
            emp = empirical(draw, 6000)
            assert (emp - exact).abs().sum() / 2 < 0.04  # total variation; sampling noise is ~0.015 here


def test_target_probs_top_k_top_p_and_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    assert torch.allclose(target_probs(logits, Sampling(1.0)), logits.softmax(-1))
    p = target_probs(logits, Sampling(1.0, top_k=2))
    assert (p[0, 2:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    p = target_probs(logits, Sampling(1.0, top_p=0.5))
    assert p[0, 0] == 1.0  # the top token alone already holds more than half the mass
    p = target_probs(logits, Sampling(0.5))
    assert torch.allclose(p, (logits / 0.5).softmax(-1))
