"""REST retrieval (draftwise.drafters.retrieval and .rest): suffix-array matches equal brute force, tries keep the
most frequent prefixes, and REST drafting is lossless."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    greedy_reference,
    run,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from draftwise.core.errors import DraftwiseError
from draftwise.core.tree import DraftTree
from draftwise.core.verify import Sampling
from draftwise.drafters.pld import PromptLookupRetriever
from draftwise.drafters.rest import RestDrafter
from draftwise.drafters.retrieval import Datastore, Retriever, build_datastore, frequent_prefix_tree
from draftwise.targets.hf import HFTarget
from draftwise.targets.lean.model import LeanTarget

VOCAB = 4  # tiny alphabet: long matches and shared continuations are common


def brute_match(corpus: list[int], sep: int, query: list[int], max_span: int, min_span: int, width: int):
    """The longest suffix of `query` that occurs followed by a non-separator token: (ℓ, all its positions,
    their continuations up to the separator). Plain Python, no suffix array."""
    for n in range(min(max_span, len(query)), min_span - 1, -1):
        tail = query[-n:]
        hits = [p for p in range(len(corpus) - n + 1) if corpus[p : p + n] == tail]
        conts = []
        for p in hits:
            cont = corpus[p + n : p + n + width]
            conts.append(tuple(cont[: cont.index(sep)] if sep in cont else cont))
        if any(conts):
            return n, hits, conts
    return 0, [], []


def node_paths(tree: DraftTree) -> dict[tuple[int, ...], float]:
    """Every node as its token path from the root (root excluded) -> score."""
    paths: dict[int, tuple[int, ...]] = {0: ()}
    for i in range(1, tree.size):
        paths[i] = (*paths[int(tree.parents[i])], int(tree.tokens[i]))
    return {paths[i]: round(float(tree.scores[i]), 5) for i in range(1, tree.size)}


def check_tree(tree: DraftTree) -> None:
    assert int(tree.parents[0]) == -1
    assert all(0 <= int(p) < i for i, p in enumerate(tree.parents.tolist()) if i)


sequences = st.lists(st.lists(st.integers(0, VOCAB - 1), max_size=40), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(
    seqs=sequences,
    query=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12),
    max_span=st.integers(2, 8),
    from_corpus=st.booleans(),
)
def test_match_equals_brute_force(seqs, query, max_span, from_corpus):
    if from_corpus and any(len(s) > 3 for s in seqs):  # a query that surely matches: a corpus substring
        longest = max(seqs, key=len)
        query = longest[: len(longest) // 2 + 1]
    with tempfile.TemporaryDirectory() as tmp:
        if not any(seqs):
            with pytest.raises(DraftwiseError, match="corpus is empty"):
                build_datastore(seqs, Path(tmp) / "ds", VOCAB)
            return
        build_datastore(seqs, Path(tmp) / "ds", VOCAB)
        store = Datastore.load(Path(tmp) / "ds", max_span=max_span, min_span=2, max_matches=10_000)
        corpus = store.tokens.tolist()
        assert sorted(store.suffix_array.tolist()) == list(range(len(corpus)))
        length, positions, conts = store.match(torch.tensor(query))
        want_length, want_positions, want_conts = brute_match(corpus, VOCAB, query, max_span, 2, 10)
        assert length == want_length
        assert sorted(positions.tolist()) == want_positions
        got = Counter(tuple(int(t) for t in row if t >= 0) for row in conts)
        assert got == Counter(want_conts)


@settings(max_examples=60, deadline=None)
@given(
    conts=st.lists(st.lists(st.integers(0, VOCAB - 1), max_size=6), min_size=1, max_size=30),
    budget=st.integers(1, 40),
)
def test_frequent_prefix_tree_keeps_the_most_frequent_prefixes(conts, budget):
    matrix = np.full((len(conts), 6), -1, np.int64)
    for i, c in enumerate(conts):
        matrix[i, : len(c)] = c
    tree = frequent_prefix_tree(7, matrix, budget)
    full = DraftTree.from_sequences(7, conts)  # brute force: the whole trie, scored log(count / k)
    check_tree(tree)
    assert int(tree.tokens[0]) == 7 and tree.size == min(budget, full.size)
    kept, everything = node_paths(tree), node_paths(full)
    assert all(everything[path] == score for path, score in kept.items())  # same counts as the full trie
    best = full.select_top(budget)  # ranked by score, then depth: the same multiset must be kept
    assert sorted((s, len(p)) for p, s in kept.items()) == sorted((s, len(p)) for p, s in node_paths(best).items())


def test_max_matches_spreads_over_the_occurrences(tmp_path):
    seqs = [[0, 1, 2, i % 3] for i in range(300)]
    build_datastore(seqs, tmp_path / "ds", vocab_size=3)
    store = Datastore.load(tmp_path / "ds", max_matches=30)
    length, positions, conts = store.match([0, 1])
    assert length == 2 and len(positions) == 30
    assert Counter(conts[:, 1].tolist()) == {0: 10, 1: 10, 2: 10}  # not only the lexicographically first rows
    retrieved = store.retrieve(torch.tensor([0, 1]), budget=4)
    assert retrieved is not None and retrieved.match == 2
    tree = retrieved.tree
    assert tree.size == 4 and tree.tokens[:2].tolist() == [1, 2]
    assert store.retrieve(torch.tensor([2, 2, 2]), budget=4) is None  # no occurrence followed by a token


def test_datastore_files_are_memory_mapped(tmp_path):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 50, size=int(rng.integers(1, 40))).tolist() for _ in range(12)]
    meta = build_datastore(seqs, tmp_path / "ds", vocab_size=50, meta={"model": "tiny"})
    store = Datastore.load(tmp_path / "ds")
    assert isinstance(store.tokens, np.memmap) and isinstance(store.suffix_array, np.memmap)
    on_disk = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert on_disk == meta and meta["model"] == "tiny"
    assert meta["num_tokens"] == sum(map(len, seqs)) and meta["num_sequences"] == 12
    assert meta["separator"] == 50 and store.tokens.dtype == np.uint16 and meta["build_seconds"] >= 0
    assert meta["bytes"]["tokens"] == (tmp_path / "ds" / "tokens.npy").stat().st_size
    flat = np.concatenate([np.append(s, 50) for s in seqs])
    assert np.array_equal(store.tokens, flat)
    suffixes = [tuple(flat[i:].tolist()) for i in store.suffix_array.tolist()]
    assert suffixes == sorted(suffixes)
    build_datastore([[1, 2, 3]], tmp_path / "ds", vocab_size=50)  # rebuilding replaces it
    assert Datastore.load(tmp_path / "ds").meta["num_tokens"] == 3
    with pytest.raises(DraftwiseError, match="token ids must lie"):
        build_datastore([[1, 99]], tmp_path / "other", vocab_size=50)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(DraftwiseError, match="not a datastore"):
        build_datastore([[1]], tmp_path / "busy", vocab_size=50)


def test_both_retrievers_share_one_interface(tmp_path):
    build_datastore([[5, 6, 7, 8]], tmp_path / "ds", vocab_size=10)
    retrievers: list[Retriever] = [Datastore.load(tmp_path / "ds"), PromptLookupRetriever()]
    context = torch.tensor([5, 6, 7, 8, 1, 5, 6])
    for retriever in retrievers:
        retrieved = retriever.retrieve(context, budget=3)
        assert retrieved is not None and retrieved.tree.tokens.tolist() == [6, 7, 8] and retrieved.match == 2
        assert retriever.retrieve(torch.tensor([9, 9, 3]), budget=3) is None


def tiny_datastore(model, path: Path) -> tuple[list[list[int]], list[list[int]]]:
    """A datastore holding the tiny model's own greedy continuations of some prompts (some corrupted, so
    retrieved drafts are partly wrong) plus noise. Returns (prompts, their greedy outputs)."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 96, (12,), generator=gen).tolist() for _ in range(4)]
    outputs = [greedy_reference(model, p, 32) for p in prompts]
    corpus = [p + o for p, o in zip(prompts, outputs, strict=True)]
    for seq in corpus[:3]:
        bad = list(seq)
        bad[20::7] = [(t + 1) % 96 for t in bad[20::7]]
        corpus.append(bad)
    corpus += [torch.randint(0, 96, (200,), generator=gen).tolist() for _ in range(5)]
    build_datastore(corpus, path, vocab_size=96)
    return prompts, outputs


@pytest.mark.parametrize("target_class", [HFTarget, LeanTarget], ids=["hf", "lean (trees sized by cost)"])
def test_rest_greedy_is_lossless(tiny_model, tmp_path, target_class):
    prompts, outputs = tiny_datastore(tiny_model, tmp_path / "ds")
    for total_tokens in (4, 16):
        drafter = RestDrafter(datastore=str(tmp_path / "ds"), total_tokens=total_tokens, vocab_size=96)
        accepted = []
        for prompt, want in zip(prompts, outputs, strict=True):
            got, stats = run(tiny_model, drafter, prompt, 32, target_class=target_class)
            assert got == want
            accepted.append(stats.mean_accepted)
        assert max(accepted) > 2  # retrieval really drafts the model's own continuations
    other = torch.randint(0, 96, (10,), generator=torch.Generator().manual_seed(9)).tolist()
    assert run(tiny_model, drafter, other, 20)[0] == greedy_reference(tiny_model, other, 20)
    tokens, _ = run(tiny_model, drafter, prompts[0], 20, sampling=Sampling(temperature=1.0), seed=3)
    assert len(tokens) == 20  # sampling verification takes the deterministic retrieval proposals too


def test_rest_drafter_errors(tmp_path):
    with pytest.raises(DraftwiseError, match="datastore build --corpus"):
        RestDrafter(datastore=str(tmp_path / "nothing"))
    build_datastore([[1, 2, 3]], tmp_path / "ds", vocab_size=1000)
    with pytest.raises(DraftwiseError, match="1000-token vocabulary"):
        RestDrafter(datastore=str(tmp_path / "ds"), vocab_size=96)
    with pytest.raises(DraftwiseError, match="must be positive"):
        RestDrafter(datastore=str(tmp_path / "ds"), total_tokens=0)


def test_building_over_a_directory_that_is_not_a_datastore_deletes_nothing(tmp_path):
    """A distill or log-rounds directory has a meta.json too: `datastore build --out` there must refuse, not
    delete its shards; an older datastore is replaced whole, and nothing is left beside it."""
    distill = tmp_path / "distill"
    distill.mkdir()
    (distill / "meta.json").write_text('{"model": "m"}')
    (distill / "shard_00000.safetensors").write_bytes(b"precious")
    with pytest.raises(DraftwiseError, match="not a datastore"):
        build_datastore([[1, 2, 3]], distill, vocab_size=10)
    assert (distill / "shard_00000.safetensors").read_bytes() == b"precious"

    store = tmp_path / "store"
    build_datastore([[1, 2, 3]], store, vocab_size=10)
    build_datastore([[4, 5, 6, 7]], store, vocab_size=10)
    assert Datastore.load(store).meta["num_tokens"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["distill", "store"]
    (store / "notes.txt").write_text("mine")  # a datastore directory with a user's file in it is not replaced
    with pytest.raises(DraftwiseError, match="not a datastore"):
        build_datastore([[1]], store, vocab_size=10)
    assert (store / "notes.txt").exists()
