"""The round logger (draftwise.policies.learn.logger) is an exact offline simulator of every truncated tree."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    DEPTH,
    TOP_K,
    ModelTreeDrafter,
    noisy_copy,
    tiny_llama,
)

from draftwise.core.tree import DraftTree
from draftwise.core.verify import Sampling, accept_greedy, accept_sampling, target_probs
from draftwise.policies.learn.logger import log_generation, prefix_size
from draftwise.policies.learn.offline import (
    rounds_from_records,
    truncation_table,
)
from draftwise.targets.hf import HFTarget

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread


def reach_of(tree: DraftTree, probs: torch.Tensor) -> torch.Tensor:
    reach = torch.ones(tree.size)
    for i in range(1, tree.size):
        reach[i] = reach[tree.parents[i]] * probs[tree.parents[i], tree.tokens[i]]
    return reach


def test_logged_acceptance_equals_running_each_truncated_tree():
    """For every round, every number of calls L and every size V: the accepted length computed offline from
    the union's verdict equals accept_greedy on that truncated tree verified alone, and P(A >= d) at T = 1
    equals the reach of the tree's own forward."""
    model = tiny_llama(vocab_size=32)
    drafter = ModelTreeDrafter(noisy_copy(model, 0.25), TOP_K, DEPTH)
    target = HFTarget(model)
    sizes = (1, 2, 4, 8, 12)
    direct = []

    def verify_truncations(candidates: DraftTree, context: int) -> None:
        past, outcome = target.length, {}
        for calls in range(DEPTH + 1):
            prefix = candidates.subtree(torch.arange(min(prefix_size(calls, TOP_K), candidates.size)))
            for v in sizes:
                tree = prefix.select_top(v)
                out = target.forward_tree(tree)
                path, _ = accept_greedy(tree, out.logits)
                reach = reach_of(tree, target_probs(out.logits, Sampling(1.0)))
                by_depth = [float(reach[tree.depths == d].sum()) for d in range(DEPTH + 2)]
                outcome[calls, v] = (len(path) - 1, tree.size, by_depth)
                target.truncate(past)
        direct.append(outcome)

    records = list(log_generation(target, drafter, [5, 7, 3, 9, 11], 48, sizes, before_verify=verify_truncations))
    assert len(records) == len(direct) > 5
    accepted_any = 0
    for record, outcome in zip(records, direct, strict=True):
        accepted, size, _, reach = truncation_table(record, TOP_K, DEPTH, sizes)
        for (calls, v), (a, n, by_depth) in outcome.items():
            j = sizes.index(v)
            assert accepted[calls, j] == a and size[calls, j] == n
            np.testing.assert_allclose(reach[calls, j], by_depth, atol=1e-5)
            accepted_any += a > 0
    assert accepted_any > 0 and len({r["accepted"] for r in records}) > 1  # the check saw real acceptances
    rounds = rounds_from_records(
        [{"prompt_id": 0, **r} for r in records], TOP_K, DEPTH, sizes
    )  # and the RoundSet agrees
    assert rounds.accepted.shape == (len(records), DEPTH + 1, len(sizes))


def test_reach_gives_accept_sampling_acceptance_law():
    """P(A = d) = reach(depth d) - reach(depth d + 1) is the law of accept_sampling on a deterministic tree."""
    torch.manual_seed(0)
    tree = DraftTree(torch.tensor([0, 1, 2, 3, 1, 2]), torch.tensor([-1, 0, 0, 0, 1, 1]), torch.zeros(6))
    probs = torch.softmax(torch.randn(6, 4) * 1.5, -1)
    reach = reach_of(tree, probs)
    at_least = torch.tensor([float(reach[tree.depths == d].sum()) for d in range(4)])
    law = at_least - torch.cat([at_least[1:], torch.zeros(1)])
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([len(accept_sampling(tree, probs, generator)[0]) - 1 for _ in range(8000)])
    empirical = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(empirical, law, atol=0.02, rtol=0)


def test_logged_text_can_follow_the_sampling_law():
    """`--trajectory sampled`: the text is drawn by rejection sampling (reproducibly per seed, unlike greedy's),
    and the verdicts logged on it stay exact (greedy `correct` is still the argmax of each node's parent)."""
    model = tiny_llama(vocab_size=32)
    drafter = ModelTreeDrafter(noisy_copy(model, 0.25), TOP_K, DEPTH)
    prompt, sizes = [5, 7, 3, 9, 11], (1, 2, 4, 8)

    def logged(seed: int | None) -> list[dict]:
        draws = None if seed is None else torch.Generator().manual_seed(seed)
        return list(log_generation(HFTarget(model), drafter, prompt, 40, sizes, sampled=draws))

    greedy, first, again, other = logged(None), logged(0), logged(0), logged(1)
    assert first == again and first != other and first != greedy
    contexts = [r["context"] for r in first]
    assert contexts == sorted(contexts) and len(set(contexts)) == len(contexts)
