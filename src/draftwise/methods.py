"""The one registry: every method name, what it does in a line, and how it wires drafters, draft heads, retrieval
and tree policies into the drafter that runs it. Adding a method = one drafter file plus one entry here."""

from __future__ import annotations

from collections.abc import Callable

from draftwise.core.drafter import Drafter, NoDraft
from draftwise.core.errors import DraftwiseError
from draftwise.core.target import ComputeMode
from draftwise.drafters.draft_model import DraftModel
from draftwise.drafters.eagle import EagleDrafter, TreeEagleDrafter
from draftwise.drafters.pld import PromptLookup, PromptLookupRetriever
from draftwise.drafters.rasd import FittedGate, RasdDrafter
from draftwise.drafters.rest import RestDrafter
from draftwise.drafters.retrieval import Datastore, Retriever, resolve_datastore
from draftwise.drafters.tree_policy import TreePolicy
from draftwise.heads.load import load_head
from draftwise.heads.model import DraftHead
from draftwise.policies.load import policy_and_shape
from draftwise.targets.models import load_model

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
FEATURE_METHODS = frozenset({"eagle", "rasd", "radar", "ltd"})  # draft heads read the target's hidden states


def policy_drafter(
    head: DraftHead,
    policy: str | TreePolicy,
    model_name: str,
    compute: ComputeMode,
    policy_dir: str | None = None,
    **options,
) -> TreeEagleDrafter:
    """An eagle drafter driven by `policy` (a name or a TreePolicy), for a target computing in `compute`."""
    policy, shape = policy_and_shape(policy, model_name, policy_dir, compute, **options)
    drafter = TreeEagleDrafter(head, policy=policy, compute=compute, **shape)
    drafter.name = policy.name if policy.name in ("radar", "ltd") else f"eagle-{policy.name}"
    return drafter


def load_eagle(engine, draft_head: str | None = None, policy: str | None = None, **options) -> EagleDrafter:
    head = load_head(engine.target, engine.model, engine.model_name, draft_head)
    compute = engine.target.compute
    if policy is not None:  # a named tree policy (draftwise.policies): fixed, threshold, heuristic, radar, ltd
        return policy_drafter(head, policy, engine.model_name, compute, **options)
    return EagleDrafter(head, compute=compute, **options)


def load_rasd(
    engine,
    draft_head: str | None = None,
    datastore: str | None = None,
    retrieval_budget: int | None = None,
    concurrent: bool | None = None,
    gate_threshold: float | None = None,
    policy: str | None = None,
    policy_dir: str | None = None,
    **eagle_options,
) -> RasdDrafter:
    """The head plus prompt lookup, plus a REST datastore when one is named (`--datastore chat|code|DIR`);
    `policy` (fixed | threshold | heuristic | radar | ltd) shapes the head's tree before fusion."""
    retrievers: list[Retriever] = [PromptLookupRetriever()]
    if datastore:
        retrievers.append(Datastore.load(resolve_datastore(datastore)))
    options = {k: v for k, v in eagle_options.items() if v is not None}
    head = load_head(engine.target, engine.model, engine.model_name, draft_head)
    compute = engine.target.compute
    if policy is not None:
        tree_policy, options = policy_and_shape(policy, engine.model_name, policy_dir, compute, **options)
        options["policy"] = tree_policy
    drafter = RasdDrafter(
        head,
        retrievers,
        retrieval_budget=retrieval_budget,
        concurrent=concurrent,
        gate=FittedGate(threshold=gate_threshold),
        compute=compute,
        **options,
    )
    if policy is not None:
        drafter.name = f"rasd-{policy}"
    return drafter


def load_draft_model(engine, **options) -> DraftModel:
    name = options.pop("draft_model", None) or engine.model_name
    dtype = options.pop("draft_dtype", "auto")
    model, _ = load_model(name, dtype=dtype, device=str(engine.target.device))
    return DraftModel(model, vocab_size=engine.target.config.vocab_size, **options)


METHODS: dict[str, Callable[..., Drafter]] = {
    "ar": lambda engine, **options: NoDraft(),
    "pld": lambda engine, **options: PromptLookup(**options),
    "draft-model": load_draft_model,
    "eagle": lambda engine, **options: load_eagle(engine, **options),
    "rasd": lambda engine, **options: load_rasd(engine, **options),
    "radar": lambda engine, **options: load_eagle(engine, policy="radar", **options),
    "ltd": lambda engine, **options: load_eagle(engine, policy="ltd", **options),
    "rest": lambda engine, **options: RestDrafter(vocab_size=engine.target.config.vocab_size, **options),
}


def make_drafter(method: str, engine, **options) -> Drafter:
    if method not in METHODS:
        raise DraftwiseError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    try:
        return METHODS[method](engine, **options)
    except TypeError as exc:
        raise DraftwiseError(f"bad options for method '{method}': {exc}") from exc
