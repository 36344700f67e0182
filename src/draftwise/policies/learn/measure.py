"""Measuring this machine's round costs for the CostModel (draftwise.policies.cost): draft-head calls and target
verify forwards, timed twice: on their own in tight loops, and as they run in real rounds of random tree shapes
(`random_shape_rounds`). The in-place timings replace the isolated ones at every size those rounds reach, because
there a node and a head call cost several times their tight-loop time (cold caches after each forward; the loops'
minimum is also optimistic on a noisy machine; docs/results.md). The round overhead and the per-call and per-node
extras are fitted on the same rounds, and each learned policy's query is timed inside real rounds too.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from draftwise.core.tree import DraftTree
from draftwise.drafters.eagle import TreeEagleDrafter
from draftwise.drafters.tree_policy import TreePolicy
from draftwise.heads.model import KVCache
from draftwise.policies.cost import CostModel
from draftwise.policies.ltd import LtdConfig, LtdPolicy, actors
from draftwise.policies.radar import RadarConfig, RadarNet, RadarPolicy

HEAD_WIDTHS = (1, 2, 3, 4, 6, 8, 12, 16)
VERIFY_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)
CONTEXTS = (64, 320, 768)


@functools.cache
def _eviction_buffer() -> np.ndarray:
    return np.ones(64 << 20, dtype=np.uint8)


def evict_caches() -> None:
    """Read 64 MiB, more than a CPU's caches hold: a target forward streams the whole model through them, so the
    Python work of a round (a policy query, the tree bookkeeping) runs cold, many times slower than in a tight
    loop. Timing with this before each call measures that cost without loading a model."""
    _eviction_buffer().sum()


def best_ms(fn: Callable[[], object], repeats: int, before: Callable[[], object] | None = None) -> float:
    """The fastest of `repeats` timed calls after a warm-up: other work on the machine only ever adds time, so
    the minimum is the estimate least disturbed by it. `before` runs untimed ahead of every call."""
    fn()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return min(times)


@torch.inference_mode()
def measure_head(
    head, widths: Sequence[int], contexts: Sequence[int], repeats: int, before: Callable[[], object] | None = None
) -> list[tuple[int, int, float]]:
    """(width, context, ms) of one draft-head call over a frontier of `width` nodes; `before` runs untimed ahead of
    each call (a target forward, as in a round: on a CPU it evicts the head's weights from the caches, and a
    cache-hot call measured several times cheaper than a round's first one)."""
    c = head.config
    weight = head.lm_head.weight
    samples = []
    for context in contexts:
        cache = KVCache(c.num_kv_heads, c.head_dim, context + 64, weight.dtype, weight.device)
        for width in widths:
            hidden = torch.randn(width, c.hidden_size, dtype=weight.dtype, device=weight.device)
            tokens = torch.randint(0, min(1000, c.target_vocab_size), (width,), device=weight.device)
            positions = torch.full((width,), context, device=weight.device)
            mask = torch.ones(width, context + width, dtype=torch.bool, device=weight.device)

            def call(cache=cache, hidden=hidden, tokens=tokens, positions=positions, mask=mask, context=context):
                cache.length = context
                head.step(hidden, tokens, positions, cache, mask)

            samples.append((width, context, best_ms(call, repeats * 3, before)))
    return samples


def measure_verify(target, sizes: Sequence[int], contexts: Sequence[int], repeats: int) -> list[tuple[int, int, float]]:
    """(N, context, ms) of one target tree forward of N nodes (a chain: the mask's shape does not change the cost)."""
    samples, vocab = [], min(1000, int(target.config.vocab_size))
    for context in contexts:
        target.prefill(torch.randint(0, vocab, (context,)))
        for n in sizes:
            tree = DraftTree(torch.randint(0, vocab, (n,)), torch.arange(-1, n - 1), torch.zeros(n))

            def verify(tree=tree, context=context):
                target.forward_tree(tree)
                target.truncate(context)

            samples.append((n, context, best_ms(verify, repeats)))
    return samples


class RandomShapes(TreePolicy):
    """A TreePolicy drawing each round's shape at random (0..`max_calls` expansion calls, V from `sizes`), so that
    the rounds `fit_in_place` times cover the shapes a policy can choose."""

    name = "random-shapes"

    def __init__(self, max_calls: int, sizes: Sequence[int], seed: int = 0):
        self.rng, self.max_calls, self.sizes = np.random.default_rng(seed), max_calls, list(sizes)

    def begin_round(self, committed: int):
        stop_at = int(self.rng.integers(self.max_calls + 1))
        return lambda calls, frontier_scores, candidate_scores: calls < stop_at

    def verify_size(self, candidates, budget: int) -> int:
        return min(budget, int(self.rng.choice(self.sizes)))


@dataclass
class InPlaceRounds:
    """Generations with random tree shapes, and every target forward and head call timed as they ran there:
    (size or width, context, ms) samples, as measure_verify and measure_head give them in isolation."""

    generations: list
    verify_ms: list[tuple[int, int, float]]
    head_ms: list[tuple[int, int, float]]


def random_shape_rounds(engine, head, prompts: Sequence[str], max_new_tokens: int) -> InPlaceRounds:
    """Generations whose every round has a random tree shape (`RandomShapes`), timing each forward and head call
    through the target's and the head's timing hooks."""
    target, verify_ms, head_ms = engine.target, [], []
    policy = RandomShapes(3, (1, 2, 3, 4, 6, 8, 12, 16))
    drafter = TreeEagleDrafter(head, policy=policy, top_k=8, depth=3, total_tokens=16)
    engine.generate("Say hi.", drafter=drafter, max_new_tokens=8)  # warm-up
    target.on_forward = lambda nodes, context, seconds: verify_ms.append((nodes, context, 1000 * seconds))
    head.on_step = lambda width, context, seconds: head_ms.append((width, context, 1000 * seconds))
    try:
        out = [engine.generate(p, drafter=drafter, max_new_tokens=max_new_tokens).stats for p in prompts]
    finally:
        target.on_forward = head.on_step = None
    return InPlaceRounds(out, verify_ms, head_ms)


def in_place_samples(
    isolated: list[tuple[int, int, float]], in_place: list[tuple[int, int, float]], least: int = 20
) -> list[tuple[int, int, float]]:
    """The in-place samples at every size seen at least `least` times, the isolated ones at the other sizes;
    isolated sizes past the largest in-place one are scaled by the in-place / isolated ratio there (medians), so
    the curve does not drop where the sources meet."""
    by_size: dict[int, list[float]] = {}
    for x, _, ms in in_place:
        by_size.setdefault(x, []).append(ms)
    kept = {x for x, times in by_size.items() if len(times) >= least}
    if not kept:
        return list(isolated)
    top = max(kept)
    at_top = [ms for x, _, ms in isolated if x == top]
    ratio = statistics.median(by_size[top]) / statistics.median(at_top) if at_top else 1.0
    rest = [(x, c, ms * ratio if x > top else ms) for x, c, ms in isolated if x not in kept]
    return [r for r in in_place if r[0] in kept] + rest


def fit_in_place(generations: Sequence, partial: CostModel) -> tuple[float, float, float]:
    """(overhead, per draft call, per verified node past the root) in ms that the rounds of `generations` cost
    beyond the isolated timings of `partial`: least squares over every round, non-negative (a term that fits
    below zero is dropped). Isolated forwards run with the round's Python work hot in the caches; in a round it
    is cold, and the head call and the tree bookkeeping grow with the shape."""
    rows, residuals = [], []
    for stats in generations:
        context = stats.prompt_tokens - 1 + np.concatenate([[0], np.cumsum(stats.accepted)[:-1]])
        calls, size = np.asarray(stats.round_draft_calls, float), np.asarray(stats.round_verified, float)
        predicted = partial.round_s(calls, size, context, width=8, first_width=3)
        rows.append(np.stack([np.ones_like(calls), calls, size - 1], 1))
        residuals.append(1000 * (np.asarray(stats.round_s) - predicted))
    design, target = np.concatenate(rows), np.concatenate(residuals)
    keep = [0, 1, 2]
    while True:
        coef, *_ = np.linalg.lstsq(design[:, keep], target, rcond=None)
        if (coef >= 0).all() or len(keep) == 1:
            break
        keep.pop(int(np.argmin(coef)))
    fitted = dict(zip(keep, np.maximum(coef, 0.0), strict=True))
    return float(fitted.get(0, 0.0)), float(fitted.get(1, 0.0)), float(fitted.get(2, 0.0))


class TimedPolicy(TreePolicy):
    """`policy` unchanged, with the seconds of each of its queries recorded: its stop rule's in `keep_going_s`,
    its verification sizes' in `verify_size_s`."""

    def __init__(self, policy: TreePolicy):
        self.policy, self.name = policy, policy.name
        self.keep_going_s: list[float] = []
        self.verify_size_s: list[float] = []

    @property
    def queries(self) -> int:
        return self.policy.queries

    @property
    def query_s(self) -> float:
        return self.policy.query_s

    def use(self, sampling) -> None:
        self.policy.use(sampling)

    def begin_round(self, committed: int):
        keep_going = self.policy.begin_round(committed)
        if keep_going is None:
            return None

        def timed_keep_going(calls, frontier_scores, candidate_scores) -> bool:
            start = time.perf_counter()
            go = keep_going(calls, frontier_scores, candidate_scores)
            self.keep_going_s.append(time.perf_counter() - start)
            return go

        return timed_keep_going

    def verify_size(self, candidates: DraftTree, budget: int) -> int:
        start = time.perf_counter()
        size = self.policy.verify_size(candidates, budget)
        self.verify_size_s.append(time.perf_counter() - start)
        return size

    def observe(self, result) -> None:
        self.policy.observe(result)


def measure_policy_queries(engine, head, prompts: Sequence[str], max_new_tokens: int) -> dict[str, float]:
    """Ms per query of RADAR's and LTD's policies, timed inside real generations: a query runs after a target
    forward and a head call, where its NumPy work runs several times slower than in a loop (the caches are cold).
    Untrained networks of the shipped shapes: what a query costs does not depend on the weights."""
    radar = TimedPolicy(RadarPolicy(RadarNet(8), RadarConfig(top_k=8, depth=3, sample=False)))
    ltd = TimedPolicy(LtdPolicy(*actors(LtdConfig()), LtdConfig()))
    for policy in (radar, ltd):
        drafter = TreeEagleDrafter(head, policy=policy, top_k=8, depth=3, total_tokens=6)
        for prompt in prompts:
            engine.generate(prompt, drafter=drafter, max_new_tokens=max_new_tokens)
    times = {"radar": radar.keep_going_s, "ltd_depth": ltd.keep_going_s, "ltd_size": ltd.verify_size_s}
    return {name: 1000 * statistics.fmean(seconds) for name, seconds in times.items() if seconds}
