"""Drafters, one file per way of proposing a draft tree, all behind one interface (`Drafter`: begin, propose,
observe). Which method name builds which drafter is `draftwise.methods`' job; write a Drafter subclass and pass
it to `Engine.generate(..., drafter=...)` to try a new one."""

from draftwise.core.drafter import DraftContext, Drafter, NoDraft, RoundResult
from draftwise.drafters.draft_model import DraftModel
from draftwise.drafters.eagle import EagleDrafter, TreeEagleDrafter
from draftwise.drafters.pld import PromptLookup
from draftwise.drafters.rasd import RasdDrafter
from draftwise.drafters.rest import RestDrafter
from draftwise.drafters.tree_policy import TreePolicy

__all__ = [
    "DraftContext",
    "DraftModel",
    "Drafter",
    "EagleDrafter",
    "NoDraft",
    "PromptLookup",
    "RasdDrafter",
    "RestDrafter",
    "RoundResult",
    "TreeEagleDrafter",
    "TreePolicy",
]
