"""Replaying logged rounds: what any truncated tree would have accepted, and what its round would have cost.

For every logged round and every (L expansion calls, verification size V) this builds, exactly:

- `accepted[L, V]`: greedy accepted draft tokens A (the bonus token not counted);
- `reach[L, V, d]`: P(A >= d) under the logged sampling law. A node is accepted with the product of the target
  probabilities of the tokens on its path (EAGLE's deterministic-draft rule tries siblings in order and zeroes
  the rejected one, so sibling j is accepted with exactly p(c_j); RADAR, arXiv 2512.14069, §4.3), hence
  P(A >= d) is the sum of those products over the verified nodes at depth d, and P(A = d) = reach[d] - reach[d + 1];
- `size[L, V]`: nodes actually verified (V, or fewer when the first L calls drafted fewer candidates);
- `tree_depth[L, V]`: the verified tree's depth;

and with a CostModel, `seconds[L, V]`, the modelled round time. Policies are simulated on these tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from draftwise.core.errors import DraftwiseError
from draftwise.policies.cost import CostModel
from draftwise.policies.learn.logger import prefix_size
from draftwise.policies.scores import SCORE_FLOOR


def truncation_table(
    record: dict, top_k: int, depth: int, sizes: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(accepted, size, tree depth (L, S), reach (L, S, depth + 2)) of one logged round, L = 0..depth."""
    index = np.asarray(record["node_index"])
    parent = np.asarray(record["node_parent"])
    node_depth = np.asarray(record["node_depth"])
    key = np.asarray(record["node_key"], dtype=np.float32)
    correct = np.asarray(record["node_correct"], dtype=bool)
    p = np.asarray(record["node_p"], dtype=np.float64)
    n = index.size
    on_path = correct.copy()
    reach = p.copy()
    for i in range(1, n):  # parents come first (creation order)
        on_path[i] &= on_path[parent[i]]
        reach[i] *= reach[parent[i]]
    reach[0] = 1.0
    # select_top's ranking: root first, then score descending, depth, index
    order = np.lexsort((index, node_depth, -key))
    order = np.concatenate([[0], order[order != 0]])
    accepted = np.zeros((depth + 1, len(sizes)), dtype=np.int16)
    size = np.zeros((depth + 1, len(sizes)), dtype=np.int16)
    tree_depth = np.zeros((depth + 1, len(sizes)), dtype=np.int16)
    reach_table = np.zeros((depth + 1, len(sizes), depth + 2), dtype=np.float32)
    for calls in range(depth + 1):
        ranked = order[index[order] < prefix_size(calls, top_k)]
        good_depth = np.maximum.accumulate(np.where(on_path[ranked], node_depth[ranked], 0))
        deepest = np.maximum.accumulate(node_depth[ranked])
        by_depth = np.zeros((ranked.size, depth + 2))
        by_depth[np.arange(ranked.size), node_depth[ranked]] = reach[ranked]
        cumulative = by_depth.cumsum(0)
        for j, v in enumerate(sizes):
            m = min(v, ranked.size)
            accepted[calls, j] = good_depth[m - 1]
            size[calls, j] = m
            tree_depth[calls, j] = deepest[m - 1]
            reach_table[calls, j] = cumulative[m - 1]
    return accepted, size, tree_depth, reach_table


@dataclass
class RoundSet:
    """Logged rounds as arrays (R rounds, L = 0..depth calls, S verification sizes)."""

    prompt_id: np.ndarray  # (R,)
    context: np.ndarray  # (R,) committed tokens before the round
    last_accepted: np.ndarray  # (R,) tokens committed by the previous round (the catch-up call's width)
    level_scores: np.ndarray  # (R, k + depth * k * k) every candidate's cumulative log-prob, creation order
    accepted: np.ndarray  # (R, L, S) greedy accepted draft tokens
    size: np.ndarray  # (R, L, S) verified nodes
    tree_depth: np.ndarray  # (R, L, S) depth of the verified tree
    reach: np.ndarray  # (R, L, S, depth + 2) P(A >= d) under the logged sampling law
    top_k: int
    depth: int
    sizes: tuple[int, ...]

    def __len__(self) -> int:
        return int(self.prompt_id.size)

    def subset(self, mask: np.ndarray) -> RoundSet:
        scalar = ("top_k", "depth", "sizes")
        arrays = {f.name: getattr(self, f.name)[mask] for f in fields(self) if f.name not in scalar}
        return RoundSet(**arrays, top_k=self.top_k, depth=self.depth, sizes=self.sizes)

    def split_by_prompt(self, validation: float = 0.15, seed: int = 0) -> tuple[RoundSet, RoundSet]:
        """Train/validation split at the prompt level (a round-level split leaks a prompt into both)."""
        prompts = np.unique(self.prompt_id)
        rng = np.random.default_rng(seed)
        held = rng.choice(prompts, size=max(1, round(len(prompts) * validation)), replace=False)
        mask = np.isin(self.prompt_id, held)
        return self.subset(~mask), self.subset(mask)

    def level(self, calls: int) -> np.ndarray:
        """(R, k) or (R, k*k): the candidates created by call `calls` (0 = the root's top-k)."""
        k = self.top_k
        if calls == 0:
            return self.level_scores[:, :k]
        start = k + (calls - 1) * k * k
        return self.level_scores[:, start : start + k * k]

    def frontier(self, calls: int) -> np.ndarray:
        """(R, k) the frontier after `calls` expansion calls, sorted descending (RADAR's state s_calls)."""
        return -np.sort(-self.level(calls), axis=1)[:, : self.top_k]

    def size_index(self, size: int) -> int:
        if size not in self.sizes:
            raise DraftwiseError(f"the logs hold verification sizes {self.sizes}, not {size}")
        return self.sizes.index(size)

    def tokens(self, calls: np.ndarray, size_index: np.ndarray, mode: str = "greedy") -> np.ndarray:
        """(R,) expected tokens committed per round (accepted + bonus) for per-round choices."""
        rows = np.arange(len(self))
        if mode == "greedy":
            return self.accepted[rows, calls, size_index].astype(np.float64) + 1.0
        return 1.0 + self.reach[rows, calls, size_index, 1:].sum(-1).astype(np.float64)

    def seconds(self, cost: CostModel, calls: np.ndarray, size_index: np.ndarray) -> np.ndarray:
        """(R,) modelled round time: 1 + calls head calls and the verified size at this round's context."""
        rows = np.arange(len(self))
        size = self.size[rows, calls, size_index]
        first = np.clip(self.last_accepted, 1, None)
        return np.asarray(cost.round_s(calls + 1, size, self.context, width=self.top_k, first_width=first))


def logged_settings(directory: Path) -> dict:
    """How `draftwise log-rounds` logged the rounds in `directory` (its meta.json)."""
    return json.loads((Path(directory) / "meta.json").read_text())["settings"]


def load_rounds(directory: Path) -> RoundSet:
    """Every Parquet part under `directory` (written by `draftwise log-rounds`) as one RoundSet."""
    import pyarrow.parquet as pq  # the optional [train] extra

    directory = Path(directory)
    parts = sorted(directory.glob("part-*.parquet"))
    if not parts:
        raise DraftwiseError(f"no logged rounds in {directory}; run `draftwise log-rounds --out {directory}` first")
    settings = logged_settings(directory)
    return rounds_from_records(
        [row for part in parts for row in pq.read_table(part).to_pylist()],
        settings["top_k"],
        settings["depth"],
        tuple(settings["sizes"]),
    )


def rounds_from_records(records: list[dict], top_k: int, depth: int, sizes: tuple[int, ...]) -> RoundSet:
    if not records:
        raise DraftwiseError("no rounds to replay")
    tables = [truncation_table(r, top_k, depth, sizes) for r in records]
    width = top_k + depth * top_k * top_k
    scores = np.full((len(records), width), SCORE_FLOOR, dtype=np.float32)
    for i, r in enumerate(records):
        row = np.asarray(r["level_scores"][:width], dtype=np.float32)
        scores[i, : row.size] = row
    return RoundSet(
        prompt_id=np.asarray([r["prompt_id"] for r in records]),
        context=np.asarray([r["context"] for r in records]),
        last_accepted=np.asarray([r["last_accepted"] for r in records]),
        level_scores=np.clip(scores, SCORE_FLOOR, 0.0),
        accepted=np.stack([t[0] for t in tables]),
        size=np.stack([t[1] for t in tables]),
        tree_depth=np.stack([t[2] for t in tables]),
        reach=np.stack([t[3] for t in tables]),
        top_k=top_k,
        depth=depth,
        sizes=sizes,
    )


@dataclass
class Simulation:
    """Per-round outcome of a policy replayed on logged rounds."""

    calls: np.ndarray  # (R,) expansion calls L
    size_index: np.ndarray  # (R,)
    tokens: np.ndarray  # (R,) committed tokens (expected, in sampling mode)
    seconds: np.ndarray  # (R,)

    def summary(self, sizes: tuple[int, ...]) -> dict:
        return {
            "draft_calls": float(np.mean(self.calls + 1)),
            "verify_size": float(np.mean(np.asarray(sizes)[self.size_index])),
            "tau": float(np.mean(self.tokens)),
            "tokens_per_s": float(self.tokens.sum() / self.seconds.sum()),
        }


def simulate(
    rounds: RoundSet,
    cost: CostModel,
    calls: np.ndarray,
    size_index: np.ndarray,
    mode: str = "greedy",
    policy_s: np.ndarray | float = 0.0,
) -> Simulation:
    """Replay fixed per-round choices; `policy_s` adds the policy's own time per round."""
    calls = np.asarray(calls, dtype=np.int64)
    size_index = np.asarray(size_index, dtype=np.int64)
    tokens = rounds.tokens(calls, size_index, mode)
    seconds = rounds.seconds(cost, calls, size_index) + policy_s
    return Simulation(calls, size_index, tokens, seconds)


def fixed(rounds: RoundSet, calls: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Choices of EAGLE-2's fixed tree: every round `calls` expansions and `size` nodes."""
    n = len(rounds)
    return np.full(n, calls), np.full(n, rounds.size_index(size))


def choice_table(
    rounds: RoundSet, cost: CostModel, max_calls: int, mode: str = "greedy"
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """(tokens, seconds) per round (R, C) for every fixed choice of the grid: C (calls, size index) pairs."""
    grid = [(c, v) for c in range(max_calls + 1) for v in range(len(rounds.sizes))]
    n = len(rounds)
    tokens = np.stack([rounds.tokens(np.full(n, c), np.full(n, v), mode) for c, v in grid], 1)
    seconds = np.stack([rounds.seconds(cost, np.full(n, c), np.full(n, v)) for c, v in grid], 1)
    return tokens, seconds, grid


def best_fixed(rounds: RoundSet, cost: CostModel, max_calls: int, mode: str = "greedy") -> tuple[int, int, float]:
    """The fixed (calls, size) with the highest simulated tokens/s: the grid-searched EAGLE-2 baseline."""
    tokens, seconds, grid = choice_table(rounds, cost, max_calls, mode)
    speeds = tokens.sum(0) / seconds.sum(0)
    best = int(speeds.argmax())
    calls, size_index = grid[best]
    return calls, rounds.sizes[size_index], float(speeds[best])


def best_choices(tokens: np.ndarray, seconds: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Dinkelbach's method: the per-group choice (one column of `tokens`/`seconds` (R, C) for every round of a
    group) that maximises total tokens / total seconds. Each step picks argmax of tokens - λ·seconds per group and
    sets λ to the ratio it reaches; λ never decreases and the choice set is finite, so it ends at the optimum."""
    n_groups = int(groups.max()) + 1
    speed, choice = 0.0, np.zeros(n_groups, dtype=np.int64)
    for _ in range(100):
        gain = np.zeros((n_groups, tokens.shape[1]))
        np.add.at(gain, groups, tokens - speed * seconds)
        choice = gain.argmax(1)
        picked = choice[groups]
        rows = np.arange(len(groups))
        new_speed = tokens[rows, picked].sum() / seconds[rows, picked].sum()
        if new_speed <= speed * (1 + 1e-12):
            break
        speed = new_speed
    return choice


def headroom(
    train: RoundSet, validation: RoundSet, cost: CostModel, max_calls: int, mode: str = "greedy", bins: int = 8
) -> dict[str, dict]:
    """How much any depth/size policy could gain over the best fixed tree on these rounds.

    - `hindsight oracle`: every round picks its best (calls, size) knowing what the target accepts; no policy
      that sees only the drafter's state reaches it.
    - `confidence bins`: (calls, size) per bin of the root's top draft probability, fitted on `train` and
      replayed on `validation`: what the drafter's most telling signal is worth before the first draft call.
    """

    def replay(rounds: RoundSet, picked: np.ndarray, grid: list[tuple[int, int]]) -> dict:
        calls = np.asarray([grid[i][0] for i in picked])
        size_index = np.asarray([grid[i][1] for i in picked])
        return simulate(rounds, cost, calls, size_index, mode).summary(rounds.sizes)

    tokens, seconds, grid = choice_table(validation, cost, max_calls, mode)
    oracle = best_choices(tokens, seconds, np.arange(len(validation)))
    top = train.level(0).max(1)
    edges = np.quantile(top, np.linspace(0, 1, bins + 1)[1:-1])
    train_tokens, train_seconds, _ = choice_table(train, cost, max_calls, mode)
    per_bin = best_choices(train_tokens, train_seconds, np.digitize(top, edges))
    return {
        "hindsight oracle": replay(validation, oracle, grid),
        f"confidence bins ({bins})": replay(validation, per_bin[np.digitize(validation.level(0).max(1), edges)], grid),
    }
