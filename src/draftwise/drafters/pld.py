"""Prompt lookup decoding (PLD) as a tree: every recent match of the trailing n-gram contributes a branch."""

from __future__ import annotations

from collections import OrderedDict

import torch

from draftwise.core.drafter import DraftContext, Drafter, RoundResult
from draftwise.core.tree import DraftTree
from draftwise.drafters.retrieval import Retrieved
from draftwise.drafters.sizing import CostSizer

PLD_TOTAL_TOKENS = 24  # nodes of the merged trie at most, before cost sizing


class NgramStore:
    """Where every n-gram (min_ngram..max_ngram long) of a set of token sequences ends, so that the continuations
    of a context's trailing n-gram are a dictionary lookup. Sequences are appended to as they grow, and the oldest
    are forgotten once more than `capacity` tokens are kept."""

    def __init__(self, max_ngram: int, min_ngram: int, capacity: int) -> None:
        self.lengths = range(max_ngram, min_ngram - 1, -1)
        self.capacity = capacity
        self.sequences: OrderedDict[int, list[int]] = OrderedDict()
        self.ends: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        self.size = 0
        self.evicted = False  # some sequence was forgotten: `ends` may name it

    def extend(self, key: int, tokens: list[int]) -> None:
        seq = self.sequences.setdefault(key, [])
        start = len(seq)
        seq += tokens
        self.size += len(tokens)
        for end in range(start + 1, len(seq) + 1):
            for n in self.lengths:
                if end >= n:
                    self.ends.setdefault(tuple(seq[end - n : end]), []).append((key, end))
        while self.size > self.capacity and len(self.sequences) > 1:
            _, old = self.sequences.popitem(last=False)
            self.size -= len(old)  # their entries in `ends` are dropped on lookup
            self.evicted = True

    def lookup(self, context: list[int], length: int, limit: int = 8):
        """(n, continuations) of the longest trailing n-gram of `context` that occurs with a continuation."""
        for n in self.lengths:
            if len(context) < n:
                continue
            ends = self.ends.get(tuple(context[-n:]))
            if not ends:
                continue
            if self.evicted:
                ends[:] = [(k, e) for k, e in ends if k in self.sequences]
            found = []
            for key, end in reversed(ends):
                continuation = self.sequences[key][end : end + length]
                if continuation:
                    found.append(continuation)
                if len(found) == limit:
                    break
            if found:
                return n, found
        return 0, []


class NgramIndex:
    """The n-gram index of one growing context: kept up to date as tokens are appended, so a lookup costs O(new
    tokens) instead of a scan of the whole context every round (a sizeable share of a round at long contexts).
    `lookup` gives the continuations of earlier occurrences of the trailing n-gram, longest n first (stopping at
    the first n that matches), most recent occurrence first."""

    def __init__(self, max_ngram: int, min_ngram: int) -> None:
        self.ngram_range = (max_ngram, min_ngram)
        self.seen = torch.zeros(0, dtype=torch.long)  # the tokens last indexed, to tell a new sequence apart
        self.store = NgramStore(max_ngram, min_ngram, 1 << 62)

    def _sync(self, tokens: torch.Tensor) -> None:
        known = self.seen.numel()
        if tokens.numel() < known or not torch.equal(tokens[:known], self.seen[:known]):  # another sequence
            self.store, known = NgramStore(*self.ngram_range, 1 << 62), 0
        self.seen = tokens
        self.store.extend(0, tokens[known:].tolist())

    def lookup(self, tokens: torch.Tensor, length: int, max_matches: int) -> tuple[int, list[list[int]]]:
        self._sync(tokens)
        return self.store.lookup(self.store.sequences.get(0, []), length, max_matches)


class PromptLookupRetriever:
    """Prompt lookup as a Retriever (see draftwise.drafters.retrieval): the datastore is the context itself."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, num_pred_tokens: int = 10, max_matches: int = 4):
        self.num_pred_tokens, self.max_matches = num_pred_tokens, max_matches
        self.index = NgramIndex(max_ngram, min_ngram)

    def lookup(self, tokens: torch.Tensor) -> tuple[int, list[list[int]]]:
        return self.index.lookup(tokens, self.num_pred_tokens, self.max_matches)

    def retrieve(self, tokens: torch.Tensor, budget: int) -> Retrieved | None:
        """The trie of the matches' continuations, at most `budget` nodes; None when nothing matches."""
        n, spans = self.lookup(tokens)
        if not spans:
            return None
        return Retrieved(DraftTree.from_sequences(int(tokens[-1]), spans).select_top(budget), n)


class PromptLookup(Drafter):
    """Copies spans that followed the same n-gram earlier in the prompt or output (Saxena 2023), several
    matches merged into one trie, ranked by how many matches agree on each prefix.

    When the target reports its verification cost (the llama engine does), the trie is cut to the size that
    maximises expected tokens per second (drafters/sizing.py), nodes judged by the matched n-gram length,
    their depth and whether every match agrees on them."""

    name = "pld"

    def __init__(
        self,
        max_ngram: int = 3,
        min_ngram: int = 1,
        num_pred_tokens: int = 10,
        max_matches: int = 4,
        total_tokens: int = PLD_TOTAL_TOKENS,
    ):
        super().__init__()
        self.retriever = PromptLookupRetriever(max_ngram, min_ngram, num_pred_tokens, max_matches)
        self.total_tokens = total_tokens
        self.sizer = CostSizer()

    def propose(self, context: DraftContext) -> DraftTree:
        root = int(context.tokens[-1])
        n, spans = self.retriever.lookup(context.tokens)
        if not spans:
            return DraftTree.root_only(root)
        tree = DraftTree.from_sequences(root, spans).select_top(min(self.total_tokens, context.budget))
        if context.verify_cost is None:
            return tree
        return self.sizer.size(tree, node_kinds(tree, n), context.verify_cost)[0]

    def observe(self, result: RoundResult) -> None:
        self.sizer.observe(result.path)


def node_kinds(tree: DraftTree, ngram: int) -> list[tuple[int, int, bool]]:
    """(matched n-gram length, depth up to 8, every match agrees here) of each node: what predicts acceptance."""
    depths = tree.depths.clamp_max(8).tolist()
    unanimous = (tree.scores > -1e-6).tolist()
    return [(ngram, d, u) for d, u in zip(depths, unanimous, strict=True)]
