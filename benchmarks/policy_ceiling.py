"""How much could any per-round choice of (draft calls, verification size) gain over the best fixed tree, given
what a policy can see when it chooses? Out of fold, on logged rounds, under a cost model.

Each policy here is a lookup table: the rounds are binned by signals a drafter has when it decides (the root's
top draft score after the catch-up call, the previous round's, what the previous round committed, and, for the
two-stage table, the best score after one expansion call, paid for by that call), and each bin gets the
(calls, size) that maximises total tokens / total seconds on the training folds (Dinkelbach's method). The
tables are fitted on four fifths of the prompts and replayed on the fifth, five times. A table with a bin per
round is the hindsight oracle, which no policy reaches. If the best table sits a few percent above the best fixed
tree, a learned policy that sees the same signals (LTD's depth and size policies, RADAR) has little more to find.

    COST=src/draftwise/data/policies/smollm2-135m/float32-w4a8/cost.json
    python benchmarks/policy_ceiling.py --rounds runs/rounds-prefetch --cost $COST \
        --out benchmarks/runs/policy-ceiling.json
    python benchmarks/policy_ceiling.py --rounds runs/rounds-t1 --mode sampling --cost $COST \
        --out benchmarks/runs/policy-ceiling-t1.json
    python benchmarks/policy_ceiling.py --rounds runs/rounds-prefetch --cost $COST --accelerator-like 1.3,0.05 \
        --out benchmarks/runs/policy-ceiling-flat.json

`--accelerator-like F,H` replaces the profiled prices by an accelerator's shape (the same acceptance logs): a
64-node tree costs F one-token forwards, linearly between, and a head call H of one.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from draftwise.policies.cost import CostModel, PiecewiseLinear
from draftwise.policies.learn.offline import RoundSet, best_choices, choice_table, load_rounds


def quantile_bins(values: np.ndarray, train: np.ndarray, bins: int) -> np.ndarray:
    """Bin index of every value, by quantiles of the training rows."""
    return np.digitize(values, np.unique(np.quantile(values[train], np.linspace(0, 1, bins + 1)[1:-1])))


def fit_table(tokens: np.ndarray, seconds: np.ndarray, groups: np.ndarray, columns: np.ndarray) -> dict[int, int]:
    """Per group, the column (of `columns`) with the best total tokens / seconds, every group sharing one λ."""
    choice = best_choices(tokens[:, columns], seconds[:, columns], groups)
    return {int(g): int(columns[choice[g]]) for g in np.unique(groups)}


def two_stage_table(
    tokens: np.ndarray, seconds: np.ndarray, first: np.ndarray, second: np.ndarray, stop: np.ndarray, go: np.ndarray
) -> tuple[dict[int, int | None], dict[tuple[int, int], int]]:
    """Stage 0 by `first` bin: stop (a `stop` column) or pay for one call; stage 1 by (first, second) bin: a `go`
    column. Dinkelbach over both stages: at each λ every bin takes what adds most tokens - λ·seconds."""
    speed, stage0, stage1 = 0.0, {}, {}
    for _ in range(100):
        gain = tokens - speed * seconds
        stage0, stage1, picked = {}, {}, np.zeros(len(tokens), dtype=np.int64)
        for b0 in np.unique(first):
            rows = first == b0
            stop_gain = gain[rows][:, stop].sum(0)
            go_value, go_pick = 0.0, {}
            for b1 in np.unique(second[rows]):
                sub = rows & (second == b1)
                column_gain = gain[sub][:, go].sum(0)
                go_pick[int(b1)] = int(go[column_gain.argmax()])
                go_value += column_gain.max()
            if stop_gain.max() >= go_value:
                stage0[int(b0)] = int(stop[stop_gain.argmax()])
                picked[rows] = stage0[int(b0)]
            else:
                stage0[int(b0)] = None
                for b1, column in go_pick.items():
                    stage1[(int(b0), b1)] = column
                    picked[rows & (second == b1)] = column
        rows_all = np.arange(len(tokens))
        new_speed = tokens[rows_all, picked].sum() / seconds[rows_all, picked].sum()
        if new_speed <= speed * (1 + 1e-12):
            break
        speed = new_speed
    return stage0, stage1


def two_stage_choice(
    stage0: dict[int, int | None], stage1: dict[tuple[int, int], int], b0: int, b1: int, fallback: int
) -> int:
    """A round's column under `two_stage_table`'s tables; bins the training folds never saw get `fallback`."""
    stop = stage0.get(b0, fallback)  # None: this root bin pays for the call
    return stop if stop is not None else stage1.get((b0, b1), fallback)


def accelerator_like(cost: CostModel, tree_64: float, head: float) -> CostModel:
    """`cost` with a near-flat verify curve and a cheap head, scaled from its one-token forward at no context."""
    step = cost.verify(1, 0)
    return CostModel(
        head=PiecewiseLinear([1.0, 16.0], [step * head] * 2, [0.0, 0.0]),
        verify=PiecewiseLinear([1.0, 64.0], [step, step * tree_64], cost.verify.slope_ms_per_1k[:1] * 2),
        round_overhead_ms=0.05 * step,
        meta={**cost.meta, "accelerator_like": [tree_64, head]},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=Path, required=True)
    parser.add_argument("--cost", type=Path, required=True)
    parser.add_argument("--mode", choices=["greedy", "sampling"], default="greedy")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--accelerator-like", metavar="F,H", help="price a 64-node tree at F forwards, a head call at H"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    rounds: RoundSet = load_rounds(args.rounds)
    cost = CostModel.load(args.cost)
    if args.accelerator_like:
        cost = accelerator_like(cost, *(float(x) for x in args.accelerator_like.split(",")))
    tokens, seconds, grid = choice_table(rounds, cost, rounds.depth, args.mode)
    n, rows = len(rounds), np.arange(len(rounds))
    calls = np.asarray([c for c, _ in grid])
    stop_columns, go_columns = np.flatnonzero(calls == 0), np.flatnonzero(calls >= 1)

    top0, top1 = rounds.level(0).max(1), rounds.level(1).max(1)
    new_prompt = np.r_[True, rounds.prompt_id[1:] != rounds.prompt_id[:-1]]
    previous_top = np.where(new_prompt, np.median(top0), np.r_[top0[0], top0[:-1]])
    previous_d0v2 = np.where(new_prompt, 0, np.r_[0, rounds.accepted[:-1, 0, rounds.size_index(2)]])
    last_accepted = np.clip(rounds.last_accepted, 1, 3)

    one_stage: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "root score, 4 bins": lambda tr: quantile_bins(top0, tr, 4),
        "root score, 8 bins": lambda tr: quantile_bins(top0, tr, 8),
        "root score, 16 bins": lambda tr: quantile_bins(top0, tr, 16),
        "root score x tokens last committed": lambda tr: quantile_bins(top0, tr, 4) * 10 + last_accepted,
        "root score x previous root score": lambda tr: (
            quantile_bins(top0, tr, 4) * 10 + quantile_bins(previous_top, tr, 3)
        ),
        "root score x previous d0 V2 accepted": lambda tr: quantile_bins(top0, tr, 4) * 10 + previous_d0v2,
    }
    prompts = np.unique(rounds.prompt_id)
    np.random.default_rng(0).shuffle(prompts)
    folds = np.array_split(prompts, args.folds)
    picked = {
        name: np.zeros(n, dtype=np.int64)
        for name in [*one_stage, "two-stage: root, then best after one call", "best fixed, out of fold"]
    }
    for fold in folds:
        held = np.isin(rounds.prompt_id, fold)
        train = ~held
        everything = np.zeros(train.sum(), dtype=np.int64)
        fixed_column = fit_table(tokens[train], seconds[train], everything, np.arange(len(grid)))[0]
        picked["best fixed, out of fold"][held] = fixed_column
        for name, groups_of in one_stage.items():
            groups = groups_of(train)
            table = fit_table(tokens[train], seconds[train], groups[train], np.arange(len(grid)))
            picked[name][held] = [table.get(int(g), fixed_column) for g in groups[held]]
        first, second = quantile_bins(top0, train, 4), quantile_bins(top1, train, 4)
        stage0, stage1 = two_stage_table(
            tokens[train], seconds[train], first[train], second[train], stop_columns, go_columns
        )
        picked["two-stage: root, then best after one call"][held] = [
            two_stage_choice(stage0, stage1, int(b0), int(b1), fixed_column)
            for b0, b1 in zip(first[held], second[held], strict=True)
        ]

    speeds = tokens.sum(0) / seconds.sum(0)
    best = int(speeds.argmax())
    reference = float(speeds[best])
    oracle = best_choices(tokens, seconds, rows)
    report = {
        "rounds": str(args.rounds),
        "cost": str(args.cost),
        "accelerator_like": args.accelerator_like,
        "mode": args.mode,
        "rounds_n": n,
        "prompts": int(prompts.size),
        "folds": args.folds,
        "best fixed, in sample": {
            "choice": f"d{grid[best][0]} V{rounds.sizes[grid[best][1]]}",
            "tokens_per_s": reference,
        },
        "hindsight oracle": {"tokens_per_s": float(tokens[rows, oracle].sum() / seconds[rows, oracle].sum())},
    }
    for name, choice in picked.items():
        report[name] = {"tokens_per_s": float(tokens[rows, choice].sum() / seconds[rows, choice].sum())}
    for name, entry in report.items():
        if isinstance(entry, dict):
            entry["vs best fixed"] = round(entry["tokens_per_s"] / reference, 4)
            print(f"{name:45s} {entry['tokens_per_s']:8.2f} tok/s  {entry['vs best fixed']:.3f}x")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
