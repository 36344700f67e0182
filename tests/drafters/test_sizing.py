"""Cost-aware tree sizing: the kept subtree maximises expected tokens per second, acceptance counts learn, and
prompt lookup sized this way stays lossless."""

from __future__ import annotations

import torch
from conftest import (
    greedy_reference,
    tiny_llama,
)

from draftwise.core.decode import GenerationStats, generate_tokens
from draftwise.core.tree import DraftTree
from draftwise.core.verify import Sampling
from draftwise.drafters.pld import PromptLookup
from draftwise.drafters.sizing import AcceptanceStats, size_for_throughput
from draftwise.targets.hf import HFTarget


def chain(n: int) -> DraftTree:
    return DraftTree(torch.arange(n), torch.arange(-1, n - 1), torch.zeros(n))


def test_size_for_throughput_keeps_the_best_prefix():
    tree = chain(5)
    probs = [1.0, 0.9, 0.8, 0.1, 0.05]
    # verify cost 1 + 0.5 per extra node: 2 nodes -> 1.9/1.5, 3 -> 2.7/2.0 (best), 4 -> 2.8/2.5
    kept = size_for_throughput(tree, probs, lambda n: 1 + 0.5 * (n - 1))
    assert kept.size == 3
    assert size_for_throughput(tree, probs, lambda n: float(n)).size == 1  # tokens cost linear: never pays
    assert size_for_throughput(tree, probs, lambda n: 1.0).size == 5  # free verification: keep everything


def test_acceptance_stats_learn_and_explore():
    stats = AcceptanceStats()
    tree = chain(3)
    kinds = ["root", "a", "b"]
    fresh = stats.rate("a")
    for _ in range(50):
        stats.update(tree, kinds, [0])  # "a" is always rejected; "b" is never seen (its parent was rejected)
    assert stats.rate("a") < 0.15 < fresh
    assert stats.rate("b") == fresh
    probs = stats.path_probs(tree, kinds)
    assert probs[0] == 1.0 and probs[2] <= probs[1]


def test_sized_prompt_lookup_is_lossless():
    model = tiny_llama()
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3]
    reference = greedy_reference(model, prompt, 40)
    target = HFTarget(model)
    target.verify_cost = lambda n: 1.0 + 0.3 * (n - 1)
    drafter = PromptLookup()
    stats = GenerationStats(method="pld")
    out = [
        t
        for chunk in generate_tokens(target, drafter, prompt, max_new_tokens=40, sampling=Sampling(), stats=stats)
        for t in chunk
    ]
    assert out == reference
    assert drafter.sizer.stats.seen  # it learned from the rounds


def test_rasd_node_kinds_tell_sources_apart():
    """A fused tree's head nodes, prompt-lookup nodes and datastore nodes are counted as different kinds, so a
    source that never pays (a code datastore on prose) stops being verified without cutting the one that does."""
    from draftwise.drafters.rasd import rasd_node_kinds

    head = DraftTree(torch.tensor([7, 1, 2]), torch.tensor([-1, 0, 0]), torch.tensor([0.0, -0.5, -2.5]))
    lookup = DraftTree.from_sequences(7, [[1, 4, 9]])  # one match: every node agreed on (score 0)
    datastore = DraftTree.from_sequences(7, [[8], [3]])  # two continuations that disagree
    fused = head.merge(lookup)
    sources = [(-1, 0)] * head.size + [(0, 3)] * (fused.size - head.size)  # prompt lookup matched 3 tokens
    fused_all = fused.merge(datastore)
    sources += [(1, 9)] * (fused_all.size - fused.size)  # the datastore 9, counted as 4 or more
    kinds = rasd_node_kinds(fused_all, sources)
    assert kinds[:3] == [("head", 0, 0), ("head", 1, 0), ("head", 1, 2)]  # token 1 is shared: it stays the head's
    assert (
        kinds[3:] == [("retrieved", 0, 3, 2, True), ("retrieved", 0, 3, 3, True)] + [("retrieved", 1, 4, 1, False)] * 2
    )


def test_prefix_depth_follows_one_path_from_the_root():
    tree = DraftTree.from_sequences(7, [[1, 2, 3], [1, 4]])
    assert tree.prefix_depth([1, 2, 9]) == 2 and tree.prefix_depth([1, 4]) == 2
    assert tree.prefix_depth([5, 1]) == 0 and tree.prefix_depth([]) == 0


def test_head_skip_needs_evidence_and_keeps_exploring():
    """RASD's head call is skipped only where it has measurably added less than it costs, and even then it
    runs every explore_every-th time, so a changed text can bring it back."""
    from draftwise.drafters.rasd import PayoffRule

    rule = PayoffRule(explore_every=4, min_rounds=3)
    assert not rule.skip(2.5, call_share=0.2)  # no evidence yet
    for _ in range(3):
        rule.record(2.5, gain=0.1)  # 0.1 tokens added, against (1 + 2.5) * 0.2 = 0.7 it costs
        rule.record(0.2, gain=1.0)  # where retrieval finds little, the head pays
    decisions = [rule.skip(2.5, call_share=0.2) for _ in range(8)]
    assert decisions.count(False) == 2 and decisions[3] is False  # every 4th skip runs the head anyway
    assert not any(rule.skip(0.2, call_share=0.2) for _ in range(8))
    assert not rule.skip(2.5, call_share=0.01)  # a cheap enough call always pays
