"""How much a per-round depth/size rule could gain over the best fixed tree, from logged rounds and a cost model:
the hindsight oracle, bins of the root's top draft probability, and those bins split by the previous round's
accepted length (a signal LTD's features lack). Rules are fitted on a prompt-level training split and replayed on
the held-out prompts with `offline.best_choices` (the exact ratio optimum per bin).

    python benchmarks/policy_headroom.py --rounds runs/rounds-prefetch --cost runs/policies-thp/cost.json
"""

from __future__ import annotations

import argparse

import numpy as np

from draftwise.policies.offline import best_choices, best_fixed, choice_table, load_rounds
from draftwise.profile import CostModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", required=True)
    parser.add_argument("--cost", required=True)
    parser.add_argument("--validation", type=float, default=0.3)
    args = parser.parse_args()
    rounds, cost = load_rounds(args.rounds), CostModel.load(args.cost)
    train, validation = rounds.split_by_prompt(args.validation, seed=0)
    calls, size, fixed_speed = best_fixed(validation, cost, rounds.depth)
    print(f"{len(train)} training rounds, {len(validation)} held out; best fixed there: d{calls} V{size}")
    tokens, seconds, _ = choice_table(validation, cost, rounds.depth)
    train_tokens, train_seconds, _ = choice_table(train, cost, rounds.depth)
    rows = np.arange(len(validation))

    def speed(picked: np.ndarray) -> float:
        return tokens[rows, picked].sum() / seconds[rows, picked].sum() / fixed_speed

    oracle = best_choices(tokens, seconds, rows)
    print(f"hindsight oracle: {speed(oracle):.3f}x the best fixed tree")
    top = train.level(0).max(1)
    for bins in (4, 8, 16):
        edges = np.quantile(top, np.linspace(0, 1, bins + 1)[1:-1])
        for with_last in (False, True):

            def groups(r, with_last=with_last, edges=edges):
                last = np.clip(r.last_accepted, 1, 4) if with_last else 0
                return np.digitize(r.level(0).max(1), edges) * 10 + last

            per_group = best_choices(train_tokens, train_seconds, groups(train))
            picked = per_group[np.clip(groups(validation), 0, per_group.size - 1)]
            label = " x previous accepted length" if with_last else ""
            print(f"{bins:2d} confidence bins{label}: {speed(picked):.3f}x")


if __name__ == "__main__":
    main()
