"""The decode loop: propose a tree, verify it in one target forward, accept, commit, repeat."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from draftwise.core.backoff import Backoff
from draftwise.core.drafter import DraftContext, Drafter, NoDraft, RoundResult
from draftwise.core.target import Target
from draftwise.core.tree import DraftTree
from draftwise.core.verify import Sampling, accept_greedy, accept_sampling, rows_on_demand, top_two


@dataclass
class GenerationStats:
    """Per-generation counters. τ (mean_accepted) counts the bonus token, as EAGLE and Spec-Bench do."""

    method: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    rounds: int = 0
    plain_rounds: int = 0  # rounds the back-off verified the root alone without drafting (backoff.py)
    draft_calls: int = 0
    verified_tokens: int = 0
    accepted: list[int] = field(default_factory=list)  # tokens committed per round, bonus included
    round_draft_calls: list[int] = field(default_factory=list)  # draft-network forwards per round
    round_verified: list[int] = field(default_factory=list)  # tree nodes verified per round, root included
    round_s: list[float] = field(default_factory=list)  # wall seconds from each round's start to the next's
    margins: list[float] = field(default_factory=list)  # target top-1 minus top-2 logit at each new token
    prefill_s: float = 0.0
    first_token_s: float = 0.0  # time to first token: prefill plus the first round
    draft_s: float = 0.0
    verify_s: float = 0.0
    policy_queries: int = 0  # a tree policy's own queries (RADAR, LTD) and their time, part of draft_s
    policy_s: float = 0.0
    total_s: float = 0.0
    finish_reason: str = "length"

    @property
    def mean_accepted(self) -> float:
        return sum(self.accepted) / len(self.accepted) if self.accepted else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def plain_round_share(self) -> float:
        return self.plain_rounds / self.rounds if self.rounds else 0.0

    @property
    def overhead_s(self) -> float:
        return max(0.0, self.total_s - self.prefill_s - self.draft_s - self.verify_s)

    def summary(self) -> dict:
        """The headline numbers (no per-round lists)."""
        lists = ("accepted", "round_draft_calls", "round_verified", "round_s", "margins")
        out = {k: v for k, v in asdict(self).items() if k not in lists}
        out.update(
            wall_s=self.total_s,
            mean_accepted=self.mean_accepted,
            tokens_per_s=self.tokens_per_s,
            plain_round_share=self.plain_round_share,
            overhead_s=self.overhead_s,
        )
        return out


def generate_tokens(
    target: Target,
    drafter: Drafter,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    sampling: Sampling,
    stats: GenerationStats,
    stop_token_ids: frozenset[int] = frozenset(),
    generator: torch.Generator | None = None,
    backoff: Backoff | None = None,
) -> Iterator[list[int]]:
    """Yield the newly committed tokens of every round. `stats` is filled in as it goes.

    The target's cache holds all committed tokens but the newest, which roots the next tree; so the prompt's
    last token is the first root and prefill covers the rest. A `backoff` decides before each round whether to
    draft at all (None: always).
    """
    backoff = None if isinstance(drafter, NoDraft) else backoff
    start = time.perf_counter()
    tokens: Tensor = torch.tensor(prompt_ids, dtype=torch.long)
    stats.prompt_tokens = len(prompt_ids)
    features = target.prefill(tokens[:-1])
    drafter.begin(tokens[:-1], features)
    stats.prefill_s = time.perf_counter() - start
    queries_before, query_s_before = drafter.policy_queries()
    round_start = start
    while stats.new_tokens < max_new_tokens:
        room = target.max_length - tokens.numel()
        if room <= 0:
            stats.finish_reason = "context"
            break
        t0 = time.perf_counter()
        if stats.rounds:  # the last round, with whatever its consumer did with the tokens
            stats.round_s.append(t0 - round_start)
            if backoff is not None:
                backoff.record(stats.accepted[-1], stats.round_s[-1])
        round_start = t0
        speculate = backoff is None or backoff.speculate()
        calls_before = drafter.draft_calls
        context = DraftContext(
            tokens,
            len(prompt_ids),
            sampling,
            budget=min(room, max_new_tokens - stats.new_tokens),
            generator=generator,
            verify_cost=target.verify_cost,
        )
        tree = drafter.propose(context) if speculate else DraftTree.root_only(int(tokens[-1]))
        if tree.size > context.budget:
            tree = tree.select_top(context.budget)
        while target.max_leaves and tree.size > target.max_leaves and len(tree.leaves()) > target.max_leaves:
            tree = tree.select_top(tree.size - 1)
        t1 = time.perf_counter()
        past = target.length
        out = target.forward_tree(tree)
        top2, best_next = top_two(out.logits)
        if sampling.greedy:
            path, bonus = accept_greedy(tree, out.logits, best_next)
        else:
            path, bonus = accept_sampling(tree, rows_on_demand(out.logits, sampling), generator)
        t2 = time.perf_counter()
        target.commit(past, path)  # bookkeeping below counts as overhead
        new = tree.tokens[path[1:]].tolist() + [bonus]
        margins = (top2[path, 0] - top2[path, 1]).tolist()
        stop_at = next((i for i, t in enumerate(new) if t in stop_token_ids), None)
        if stop_at is not None:
            new, margins = new[: stop_at + 1], margins[: stop_at + 1]
            stats.finish_reason = "stop"
        new = new[: max_new_tokens - stats.new_tokens]
        tokens = torch.cat([tokens, torch.tensor(new, dtype=torch.long)])
        feats = out.features[path] if out.features is not None else None
        t3 = time.perf_counter()
        result = RoundResult(tree, path, bonus, feats)
        if speculate:
            drafter.observe(result)
        else:
            drafter.observe_plain(result)
        t4 = time.perf_counter()
        stats.rounds += 1
        stats.plain_rounds += not speculate
        stats.round_draft_calls.append(drafter.draft_calls - calls_before)
        stats.draft_calls += stats.round_draft_calls[-1]
        stats.verified_tokens += tree.size
        stats.round_verified.append(tree.size)
        stats.accepted.append(len(path))
        stats.margins.extend(margins[: len(new)])
        stats.new_tokens += len(new)
        stats.draft_s += (t1 - t0) + (t4 - t3)
        stats.verify_s += t2 - t1
        queries, query_s = drafter.policy_queries()
        stats.policy_queries, stats.policy_s = queries - queries_before, query_s - query_s_before
        stats.total_s = time.perf_counter() - start
        if stats.rounds == 1:
            stats.first_token_s = stats.total_s
        yield new
        if stats.finish_reason == "stop":
            break
    stats.total_s = time.perf_counter() - start
    if stats.rounds:
        stats.round_s.append(start + stats.total_s - round_start)
