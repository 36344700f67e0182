"""Drafters by method name. Adding a method = one file plus one line here."""

from __future__ import annotations

from collections.abc import Callable

from draftwise.core.drafter import DraftContext, Drafter, NoDraft, RoundResult
from draftwise.core.errors import DraftwiseError
from draftwise.drafters.draft_model import DraftModel
from draftwise.drafters.eagle import load_eagle
from draftwise.drafters.pld import PromptLookup
from draftwise.drafters.rasd import load_rasd
from draftwise.drafters.rest import RestDrafter


def _draft_model(engine, **options) -> Drafter:
    from draftwise.targets.models import load_model

    name = options.pop("draft_model", None) or engine.model_name
    dtype = options.pop("draft_dtype", "auto")
    model, _ = load_model(name, dtype=dtype, device=str(engine.target.device))
    return DraftModel(model, vocab_size=engine.target.config.vocab_size, **options)


METHODS: dict[str, Callable[..., Drafter]] = {
    "ar": lambda engine, **options: NoDraft(),
    "pld": lambda engine, **options: PromptLookup(**options),
    "draft-model": _draft_model,
    "eagle": lambda engine, **options: load_eagle(engine, **options),
    "rasd": lambda engine, **options: load_rasd(engine, **options),
    "radar": lambda engine, **options: load_eagle(engine, policy="radar", **options),
    "ltd": lambda engine, **options: load_eagle(engine, policy="ltd", **options),
    "rest": lambda engine, **options: RestDrafter(vocab_size=engine.target.config.vocab_size, **options),
}

METHOD_HELP = {
    "ar": "plain autoregressive decoding (the baseline), through the same engine",
    "pld": "prompt lookup: n-gram matches in prompt and output, merged into a tree",
    "eagle": "EAGLE-3-style draft head on the target's features, EAGLE-2 dynamic tree (--draft-head, default: shipped)",
    "rasd": "eagle's tree fused with prompt-lookup (and --datastore REST) retrieval, pruned by the head",
    "radar": "eagle with RADAR's learned stop rule (an LSTM over the frontier scores), trained for this machine",
    "ltd": "eagle with LTD's learned depth and verification-size policies (PPO), trained for this machine",
    "draft-model": "an independent HF draft model (--draft-model, default: the target's own weights)",
    "rest": "REST retrieval: continuations of the context's longest suffix in a datastore (--datastore, default chat)",
}


def make_drafter(method: str, engine, **options) -> Drafter:
    if method not in METHODS:
        raise DraftwiseError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    try:
        return METHODS[method](engine, **options)
    except TypeError as exc:
        raise DraftwiseError(f"bad options for method '{method}': {exc}") from exc


__all__ = ["METHODS", "METHOD_HELP", "DraftContext", "Drafter", "NoDraft", "RoundResult", "make_drafter"]
