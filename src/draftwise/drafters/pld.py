"""Prompt lookup decoding (PLD) as a tree: every recent match of the trailing n-gram contributes a branch."""

from __future__ import annotations

import torch

from draftwise.drafters.base import DraftContext, Drafter
from draftwise.tree import DraftTree


def lookup_continuations(
    tokens: torch.Tensor, max_ngram: int, min_ngram: int, length: int, max_matches: int
) -> list[list[int]]:
    """Continuations of earlier occurrences of the trailing n-gram, longest n first (stop at the first n that
    matches), most recent occurrence first."""
    total = tokens.numel()
    for n in range(max_ngram, min_ngram - 1, -1):
        if total <= n:
            continue
        windows = tokens.unfold(0, n, 1)[:-1]  # every n-gram but the trailing one itself
        starts = (windows == tokens[-n:]).all(1).nonzero().flatten().flip(0)[:max_matches] + n
        if starts.numel():
            return [tokens[s : s + length].tolist() for s in starts.tolist()]
    return []


class PromptLookupRetriever:
    """Prompt lookup as a Retriever (see draftwise.retrieval): the datastore is the context itself."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, num_pred_tokens: int = 10, max_matches: int = 4):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.num_pred_tokens, self.max_matches = num_pred_tokens, max_matches

    def retrieve(self, tokens: torch.Tensor, budget: int) -> DraftTree | None:
        """The trie of the matches' continuations, at most `budget` nodes; None when nothing matches."""
        spans = lookup_continuations(tokens, self.max_ngram, self.min_ngram, self.num_pred_tokens, self.max_matches)
        if not spans:
            return None
        return DraftTree.from_sequences(int(tokens[-1]), spans).select_top(budget)


class PromptLookup(Drafter):
    """Copies spans that followed the same n-gram earlier in the prompt or output (Saxena 2023), several
    matches merged into one trie, ranked by how many matches agree on each prefix."""

    name = "pld"

    def __init__(
        self,
        max_ngram: int = 3,
        min_ngram: int = 1,
        num_pred_tokens: int = 10,
        max_matches: int = 4,
        total_tokens: int = 24,
    ):
        super().__init__()
        self.retriever = PromptLookupRetriever(max_ngram, min_ngram, num_pred_tokens, max_matches)
        self.total_tokens = total_tokens

    def propose(self, context: DraftContext) -> DraftTree:
        tree = self.retriever.retrieve(context.tokens, min(self.total_tokens, context.budget))
        return tree if tree is not None else DraftTree.root_only(int(context.tokens[-1]))
