"""Tree invariants, as properties over random trees."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from draftwise.core.tree import DraftTree


@st.composite
def trees(draw, max_nodes: int = 40, vocab: int = 6) -> DraftTree:
    n = draw(st.integers(1, max_nodes))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    tokens = draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n))
    scores = [0.0] + draw(st.lists(st.floats(-20, 0), min_size=n - 1, max_size=n - 1))
    return DraftTree(torch.tensor(tokens), torch.tensor(parents), torch.tensor(scores))


def naive_ancestors(parents: list[int], i: int) -> set[int]:
    out = {i}
    while parents[i] >= 0:
        i = parents[i]
        out.add(i)
    return out


def token_paths(tree: DraftTree) -> set[tuple[int, ...]]:
    """Every root-to-node token sequence (root token excluded)."""
    parents, tokens = tree.parents.tolist(), tree.tokens.tolist()
    return {tuple(tokens[j] for j in sorted(naive_ancestors(parents, i)) if j) for i in range(tree.size)}


@given(trees())
def test_ancestor_mask_depths_and_positions(tree: DraftTree):
    parents = tree.parents.tolist()
    for i in range(tree.size):
        assert set(tree.ancestors[i].nonzero().flatten().tolist()) == naive_ancestors(parents, i)
    assert tree.depths.tolist() == [len(naive_ancestors(parents, i)) - 1 for i in range(tree.size)]
    assert tree.position_ids(7).tolist() == [[7 + d for d in tree.depths.tolist()]]
    mask = tree.attention_mask(5)
    assert mask.shape == (1, 1, tree.size, 5 + tree.size)
    assert mask[0, 0, :, :5].all() and torch.equal(mask[0, 0, :, 5:], tree.ancestors)


@given(trees())
def test_paths_cover_every_node_and_end_at_leaves(tree: DraftTree):
    paths = tree.paths()
    assert {n for p in paths for n in p} == set(range(tree.size))
    for path in paths:
        assert path[0] == 0
        assert all(tree.parents[b] == a for a, b in zip(path, path[1:], strict=False))
        assert not (tree.parents == path[-1]).any()


@given(trees(), st.integers(1, 45))
def test_select_top_is_ancestor_closed_and_prefers_high_scores(tree: DraftTree, budget: int):
    top = tree.select_top(budget)
    assert top.size == min(budget, tree.size)
    assert int(top.tokens[0]) == int(tree.tokens[0])
    assert all(0 <= p < i for i, p in enumerate(top.parents.tolist()) if i)  # a valid topologically ordered tree
    assert token_paths(top) <= token_paths(tree)
    if budget < tree.size:  # no dropped node has a strictly better root-path minimum than a kept one
        path_min = torch.where(tree.ancestors, tree.scores, torch.inf).min(1).values
        kept_scores = sorted(path_min[1:].tolist(), reverse=True)[: budget - 1]
        top_min = torch.where(top.ancestors, top.scores, torch.inf).min(1).values
        assert sorted(top_min[1:].tolist(), reverse=True) == kept_scores


@given(trees(), trees())
def test_merge_is_the_union_of_paths_without_duplicates(a: DraftTree, b: DraftTree):
    b = DraftTree(torch.cat([a.tokens[:1], b.tokens[1:]]), b.parents, b.scores)  # same root
    merged = a.merge(b)
    assert token_paths(merged) == token_paths(a) | token_paths(b)
    siblings = list(zip(merged.parents.tolist(), merged.tokens.tolist(), strict=True))[1:]
    a_siblings = list(zip(a.parents.tolist(), a.tokens.tolist(), strict=True))[1:]
    # new nodes never duplicate a sibling; the original tree's nodes keep their indices
    assert len(set(siblings) - set(a_siblings)) == len(siblings) - len(a_siblings)
    assert torch.equal(merged.tokens[: a.size], a.tokens)


@settings(max_examples=50)
@given(st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=6), max_size=6))
def test_from_sequences_holds_exactly_the_prefixes(sequences):
    tree = DraftTree.from_sequences(9, sequences)
    prefixes = {()} | {tuple(s[:k]) for s in sequences for k in range(len(s) + 1)}
    assert token_paths(tree) == prefixes
    assert (tree.scores <= 1e-6).all()


@given(trees(), st.data())
def test_greedy_acceptance_is_the_deepest_agreeing_path(tree: DraftTree, data):
    """accept_greedy against a brute force over every node's root path: the deepest node whose whole path the
    target agrees with, the lowest index among equals, and the target's choice after it as the bonus."""
    from draftwise.core.verify import accept_greedy

    best = data.draw(st.lists(st.integers(0, 5), min_size=tree.size, max_size=tree.size))
    logits = torch.nn.functional.one_hot(torch.tensor(best), 6).float()
    parents, tokens = tree.parents.tolist(), tree.tokens.tolist()
    agreeing = [
        sorted(naive_ancestors(parents, i))
        for i in range(tree.size)
        if all(tokens[j] == best[parents[j]] for j in naive_ancestors(parents, i) if j)
    ]
    expected = max(agreeing, key=len)  # max keeps the first of equals, and nodes come in index order
    assert accept_greedy(tree, logits) == (expected, best[expected[-1]])


@given(trees(), st.data())
def test_subtree_keeps_exactly_the_chosen_nodes(tree: DraftTree, data):
    parents = tree.parents.tolist()
    chosen = data.draw(st.sets(st.integers(0, tree.size - 1)))
    keep = sorted(set().union({0}, *(naive_ancestors(parents, i) for i in chosen)))
    sub = tree.subtree(torch.tensor(keep))
    assert sub.tokens.tolist() == [tree.tokens.tolist()[i] for i in keep]
    assert token_paths(sub) <= token_paths(tree)
    assert [keep[p] if p >= 0 else -1 for p in sub.parents.tolist()] == [parents[i] for i in keep]
    if len(keep) < tree.size:
        missing = next(i for i in range(1, tree.size) if i not in keep)
        child = [i for i in range(tree.size) if parents[i] == missing]
        if child:
            with pytest.raises(ValueError):
                tree.subtree(torch.tensor(keep + child[:1]))
