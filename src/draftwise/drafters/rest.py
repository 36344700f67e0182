"""REST (He et al., NAACL 2024): draft trees retrieved from an external corpus through its suffix array."""

from __future__ import annotations

from draftwise.core.drafter import DraftContext, Drafter, RoundResult
from draftwise.core.errors import DraftwiseError
from draftwise.core.tree import DraftTree
from draftwise.drafters.retrieval import Datastore, resolve_datastore
from draftwise.drafters.sizing import CostSizer


class RestDrafter(Drafter):
    """Proposes the most frequent continuations of the longest context suffix found in a datastore (see
    draftwise.drafters.retrieval); the root alone when nothing matches."""

    name = "rest"

    def __init__(
        self,
        datastore: str = "chat",
        total_tokens: int = 16,
        max_span: int = 16,
        min_span: int = 2,
        max_matches: int = 1000,
        max_continuation: int = 10,
        vocab_size: int | None = None,
    ):
        super().__init__()
        if total_tokens < 1 or min_span < 1 or max_span < min_span or max_matches < 1 or max_continuation < 1:
            raise DraftwiseError("rest: total_tokens, spans, max_matches and max_continuation must be positive")
        self.total_tokens = total_tokens
        self.store = Datastore.load(
            resolve_datastore(datastore),
            max_span=max_span,
            min_span=min_span,
            max_matches=max_matches,
            max_continuation=max_continuation,
        )
        if vocab_size is not None and self.store.vocab_size > vocab_size:
            raise DraftwiseError(
                f"datastore '{datastore}' was built for a {self.store.vocab_size}-token vocabulary "
                f"({self.store.meta.get('model', '?')}); this model has {vocab_size}"
            )

        self.sizer = CostSizer()

    def propose(self, context: DraftContext) -> DraftTree:
        budget = min(self.total_tokens, context.budget)
        retrieved = self.store.retrieve(context.tokens, budget)
        if retrieved is None:
            return DraftTree.root_only(int(context.tokens[-1]))
        tree = retrieved.tree
        if context.verify_cost is None:
            return tree
        # a node's kind: its depth and how often the corpus continued this way (log-frequency, bucketed)
        depths = tree.depths.clamp_max(8).tolist()
        frequency = (-tree.scores).clamp(0, 6).floor().int().tolist()
        return self.sizer.size(tree, list(zip(depths, frequency, strict=True)), context.verify_cost)[0]

    def observe(self, result: RoundResult) -> None:
        self.sizer.observe(result.path)
