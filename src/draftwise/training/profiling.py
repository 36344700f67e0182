"""`draftwise profile`: measure this machine's round costs (draftwise.policies.learn.measure) and fit the CostModel
(draftwise.policies.cost) that RADAR's and LTD's rewards are computed in."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

from draftwise.core.errors import DraftwiseError
from draftwise.core.tree import DraftTree
from draftwise.engine import Engine
from draftwise.heads.load import load_head
from draftwise.heads.model import DraftHead, DraftHeadConfig
from draftwise.policies.cost import CostModel, PiecewiseLinear
from draftwise.policies.learn.measure import (
    CONTEXTS,
    HEAD_WIDTHS,
    VERIFY_SIZES,
    fit_in_place,
    in_place_samples,
    measure_head,
    measure_policy_queries,
    measure_verify,
    random_shape_rounds,
)
from draftwise.training.distill import sharegpt_prompts


def profile(
    model: str,
    dtype: str,
    draft_head: str | None,
    repeats: int,
    prompts: int,
    max_new_tokens: int,
    log: Callable[[str], None] = print,
    engine_name: str = "auto",
) -> CostModel:
    """Measure and fit this machine's cost model for `model` with its draft head (a random head of the default
    shape if none ships: a head call's cost does not depend on its weights)."""
    load = os.getloadavg()[0]
    if load > 1.0:
        log(f"warning: load average {load:.1f}: other work on this machine will inflate the timings")
    engine = Engine.load(model, method="ar", dtype=dtype, engine=engine_name, backoff="off")  # time every shape
    try:
        head = load_head(engine.target, engine.model, engine.model_name, draft_head)
        head_source = draft_head or "shipped"
    except DraftwiseError:
        config = engine.model.config
        layers = (2, config.num_hidden_layers // 2, config.num_hidden_layers - 3)
        head = DraftHead(DraftHeadConfig.from_target(config, layers, min(8192, config.vocab_size)))
        head = head.to(engine.model.dtype).eval().attach_embedding(engine.model.get_input_embeddings().weight)
        head_source = "random (no trained head found)"
    log(f"head calls ({head_source}) by frontier width {HEAD_WIDTHS} at contexts {CONTEXTS}, each after a verify ...")
    target, probe, root = engine.target, torch.tensor([1, 2]), DraftTree.root_only(3)

    @torch.inference_mode()
    def verify_first() -> None:  # what runs before a round's head calls: a target forward over the last tree
        target.prefill(probe)
        target.forward_tree(root)

    head_samples = measure_head(head, HEAD_WIDTHS, CONTEXTS, repeats, verify_first)
    log(f"target verify forwards by tree size {VERIFY_SIZES} at contexts {CONTEXTS} ...")
    verify_samples = measure_verify(engine.target, VERIFY_SIZES, CONTEXTS, repeats)
    meta = {
        "model": model,
        "dtype": str(engine.model.dtype).removeprefix("torch."),
        "engine": engine.engine_name,
        "compute": engine.target.compute.name,
        "device": str(engine.target.device),
        "threads": torch.get_num_threads(),
        "head": head_source,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_average": round(load, 2),
        "samples": {"head_ms": head_samples, "verify_ms": verify_samples},
    }
    cost = CostModel(PiecewiseLinear.fit(head_samples), PiecewiseLinear.fit(verify_samples), 0.0, meta)
    if prompts > 0:
        log(f"real rounds of random shapes over {prompts} generations of {max_new_tokens} tokens ...")
        texts = sharegpt_prompts(3000 + prompts, seed=0)[3000:]  # past the draft head's training prompts
        rounds = random_shape_rounds(engine, head, texts, max_new_tokens)
        # forwards and head calls as they ran in those rounds, where they cost more than in tight loops (see
        # draftwise.policies.learn.measure); sizes the rounds did not reach keep the isolated timings
        cost.verify = PiecewiseLinear.fit(in_place_samples(verify_samples, rounds.verify_ms))
        cost.head = PiecewiseLinear.fit(in_place_samples(head_samples, rounds.head_ms))
        meta["samples"].update(in_place_verify_ms=rounds.verify_ms, in_place_head_ms=rounds.head_ms)
        extras = fit_in_place(rounds.generations, cost)
        cost.round_overhead_ms, cost.call_extra_ms, cost.node_extra_ms = extras
        log("policy queries inside real rounds ...")
        cost.policy_query_ms = measure_policy_queries(engine, head, texts, max_new_tokens)
    return cost
