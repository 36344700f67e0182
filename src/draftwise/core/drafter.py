"""The one interface every drafter implements (HF's candidate generator, with trees)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from draftwise.core.tree import DraftTree
from draftwise.core.verify import Sampling


@dataclass
class DraftContext:
    """What a drafter may look at when proposing."""

    tokens: Tensor  # (T,) every token so far; tokens[-1] is the root of the tree to propose
    prompt_length: int
    sampling: Sampling
    budget: int  # the tree may have at most this many nodes (root included)
    generator: torch.Generator | None = None  # for drafters that sample, so seeded runs repeat
    verify_cost: Callable[[int], float] | None = None  # seconds to verify N nodes, where the target measured it


@dataclass
class RoundResult:
    """The target's verdict on a proposed tree."""

    tree: DraftTree
    path: list[int]  # accepted node indices, root first
    bonus: int  # the target's own next token after the path
    features: Tensor | None  # target features at the path nodes (len(path), F, H), if requested


class Drafter(ABC):
    """Proposes a tree continuing the context; learns from each verification.

    `feature_layers` names the target hidden states this drafter reads (see draftwise.core.target.Target). `draft_calls`
    counts forwards of a draft network, so the decode loop can report them.
    """

    name: str = "drafter"
    feature_layers: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.draft_calls = 0

    def begin(self, prompt_ids: Tensor, features: Tensor | None) -> None:
        """A new sequence starts; `prompt_ids` are the tokens prefilled into the target (all but the root)."""

    @abstractmethod
    def propose(self, context: DraftContext) -> DraftTree:
        """A tree whose root is context.tokens[-1], with at most context.budget nodes."""

    def observe(self, result: RoundResult) -> None:
        """Called after every verification of a proposed tree."""

    def observe_plain(self, result: RoundResult) -> None:
        """Called instead of `observe` after a round the back-off (core/backoff.py) ran without asking `propose`: the
        root alone was verified. A drafter that keeps state per committed token must keep it in step here."""

    def policy_queries(self) -> tuple[int, float]:
        """A tree policy's own queries so far and their seconds (part of drafting, reported apart); none here."""
        return 0, 0.0


class NoDraft(Drafter):
    """Plain autoregressive decoding through the same loop: the tree is the root alone."""

    name = "ar"

    def propose(self, context: DraftContext) -> DraftTree:
        return DraftTree.root_only(int(context.tokens[-1]))
