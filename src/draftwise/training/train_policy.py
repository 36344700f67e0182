"""`draftwise train-policy --method radar|ltd`: train a tree policy on logged rounds for this machine's cost model,
print the offline validation figures the papers report, and save it (with a card) next to the cost model.

    draftwise profile                              # this machine's cost model -> data/policies/<model>/cost.json
    draftwise log-rounds --out runs/policy-rounds  # full-depth rounds on training prompts (resumable)
    draftwise train-policy --method radar          # -> data/policies/<model>/radar.safetensors + radar.json
    draftwise train-policy --method ltd            # -> ltd.safetensors + ltd.json

Validation is on held-out prompts (15%, a prompt-level split). Figures are simulated from the logs: draft calls
per round (catch-up call included), τ (tokens per round, bonus included) and tokens/s from the cost model,
against EAGLE-2's fixed tree on the same rounds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from draftwise.core.errors import DraftwiseError
from draftwise.core.files import write_atomic
from draftwise.policies.baselines import DEFAULT_THRESHOLD
from draftwise.policies.cost import POLICIES_DIR, CostModel, user_policies_dir
from draftwise.policies.learn import ltd as ltd_learn
from draftwise.policies.learn import radar as radar_learn
from draftwise.policies.learn.baselines import heuristic_calls, threshold_calls
from draftwise.policies.learn.offline import (
    RoundSet,
    best_fixed,
    fixed,
    headroom,
    load_rounds,
    logged_settings,
    simulate,
)
from draftwise.policies.ltd import LtdConfig, LtdPolicy, actors
from draftwise.policies.radar import RadarConfig, RadarNet, RadarPolicy


def baseline_table(rounds: RoundSet, cost: CostModel, depth: int, size: int, mode: str) -> dict[str, dict]:
    """Offline figures of the fixed tree, the threshold rule (a small grid) and the heuristic schedule."""
    v = rounds.size_index(size)
    n = len(rounds)
    table = {f"fixed d{depth} V{size}": simulate(rounds, cost, *fixed(rounds, depth, size), mode).summary(rounds.sizes)}
    for threshold in sorted({DEFAULT_THRESHOLD, -2.0, -3.0, -5.0, -6.0}):
        calls = threshold_calls(rounds, threshold, depth)
        table[f"threshold {threshold:g}"] = simulate(rounds, cost, calls, np.full(n, v), mode).summary(rounds.sizes)
    calls = heuristic_calls(rounds, depth, v)
    table["heuristic"] = simulate(rounds, cost, calls, np.full(n, v), mode).summary(rounds.sizes)
    best_calls, best_size, _ = best_fixed(rounds, cost, rounds.depth, mode)
    table[f"best fixed d{best_calls} V{best_size}"] = simulate(
        rounds, cost, *fixed(rounds, best_calls, best_size), mode
    ).summary(rounds.sizes)
    return table


def print_table(rows: dict[str, dict], reference: float) -> None:
    print(f"{'policy':<28} {'draft calls':>11} {'V':>6} {'τ':>6} {'tok/s':>7} {'vs fixed':>9}")
    for name, r in rows.items():
        print(
            f"{name:<28} {r['draft_calls']:>11.2f} {r['verify_size']:>6.1f} {r['tau']:>6.2f} "
            f"{r['tokens_per_s']:>7.2f} {r['tokens_per_s'] / reference:>8.3f}x"
        )


def fastest_keeping_tau(runs: list[tuple], max_tau_loss: float) -> tuple:
    """RADAR's promise is fewer draft calls at the fixed tree's acceptance: of (speed ratio, -calls, ..., report)
    runs, the fastest that beats the fixed tree with validation τ within `max_tau_loss` of its τ; if none does,
    the one of those beating the fixed tree that keeps the most τ (a policy that never stops keeps τ but is no
    RADAR); if none beats it, the fastest."""
    faster = [r for r in runs if r[0] > 1]
    keeps_tau = [r for r in faster if r[-1]["tau_ratio"] >= 1 - max_tau_loss]
    if keeps_tau:
        return max(keeps_tau, key=lambda r: (r[0], r[1]))
    if faster:
        return max(faster, key=lambda r: (r[-1]["tau_ratio"], r[0]))
    return max(runs, key=lambda r: (r[0], r[1]))


def train_radar_command(args, train: RoundSet, validation: RoundSet, cost: CostModel, out: Path) -> dict:
    torch.manual_seed(args.seed)
    # timed inside real rounds by `draftwise profile`, else here with the caches flushed (an upper bound)
    query_ms = cost.policy_query_ms.get("radar")
    query_ms = query_ms or radar_learn.measure_query_ms(RadarNet(train.top_k), train.top_k, args.depth)
    head_ms = cost.head(train.top_k, float(np.median(train.context)))
    beta = 10 * (head_ms + query_ms) / 1000  # RADAR (arXiv 2512.14069) §2.5: 10 x one continue's marginal latency
    print(f"RADAR: T_d {head_ms:.2f} ms, T_p {query_ms:.3f} ms (measured), β {beta:.4f}, γ 0.99, mode {args.mode}")
    runs = []
    for alpha in [float(a) for a in args.alphas.split(",")]:
        config = RadarConfig(
            top_k=train.top_k, depth=args.depth, size=args.size, alpha=alpha, beta=beta, mode=args.mode
        )
        config.query_ms = query_ms
        net, history = radar_learn.train_radar(train, validation, cost, config, epochs=args.epochs, seed=args.seed)
        for sample in (True, False):
            config_s = RadarConfig(**{**asdict(config), "sample": sample})
            report = radar_learn.evaluate(net, validation, cost, config_s, seed=args.seed)
            runs.append((report["speed_ratio"], -report["draft_calls"], alpha, sample, net, config_s, report))
            print(
                f"  α {alpha:<6g} {'sampled' if sample else 'argmax '}: calls {report['draft_calls']:.2f} "
                f"(fixed {report['fixed_draft_calls']:.0f}, -{100 * report['calls_reduction']:.1f}%), "
                f"τ ratio {report['tau_ratio']:.3f}, tokens/s ratio {report['speed_ratio']:.3f}"
            )
    _, _, alpha, sample, net, config, report = fastest_keeping_tau(runs, args.max_tau_loss)
    policy = RadarPolicy(net, config)
    policy.save(out)
    print(f"chose α {alpha:g}, {'sampled' if sample else 'argmax'} stops; saved {out / 'radar.safetensors'}")
    return {"method": "radar", "config": asdict(config), "validation": report}


def train_ltd_command(args, train: RoundSet, validation: RoundSet, cost: CostModel, out: Path) -> dict:
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else train.sizes
    config = LtdConfig(
        top_k=train.top_k,
        max_depth=min(args.max_depth, train.depth),
        sizes=sizes,
        default_depth=args.depth,
        default_size=args.size,
        mode=args.mode,
    )
    torch.manual_seed(args.seed)
    if {"ltd_depth", "ltd_size"} <= cost.policy_query_ms.keys():  # timed inside real rounds by `draftwise profile`
        config.query_ms, config.size_query_ms = cost.policy_query_ms["ltd_depth"], cost.policy_query_ms["ltd_size"]
    else:  # timed here with the caches flushed: an upper bound
        config.query_ms, config.size_query_ms = ltd_learn.measure_query_ms(LtdPolicy(*actors(config), config))
    print(f"LTD: depth query {config.query_ms:.3f} ms, size query {config.size_query_ms:.3f} ms (measured)")
    steps = {k: int(v * args.steps_scale) for k, v in ltd_learn.DEFAULT_STEPS.items()}
    policy, log = ltd_learn.train_ltd(train, validation, cost, config, steps, seed=args.seed)
    for entry in log:
        kept = "" if "kept" not in entry else (" (kept)" if entry["kept"] else " (discarded)")
        print(
            f"  {entry['stage']:<28} calls {entry['draft_calls']:.2f}, V {entry['verify_size']:.1f}, "
            f"τ {entry['tau']:.2f}, tokens/s ratio {entry['speed_ratio']:.3f}{kept}"
        )
    policy.save(out)
    print(f"saved {out / 'ltd.safetensors'}")
    depth_actor, size_actor = ltd_learn.argmax_actor(policy.depth_actor), ltd_learn.argmax_actor(policy.size_actor)
    report = ltd_learn.evaluate(validation, cost, config, depth_actor, size_actor)
    stages = [{k: v for k, v in e.items() if k != "curve"} for e in log]
    return {"method": "ltd", "config": asdict(config), "steps": steps, "validation": report, "stages": stages}


def write_card(out: Path, model: str) -> None:
    """README.md for the policies in `out`, from the validation records train-policy leaves there."""
    lines = [
        f"# Tree policies for {model}",
        "",
        "Trained by `draftwise train-policy` on rounds logged by `draftwise log-rounds` (full-depth eagle on ShareGPT",
        "prompts past the draft head's training slice and reasoning-gym GSM-style problems; no evaluation set), for",
        "the cost model in `cost.json` (`draftwise profile` on the machine below). Re-profile and re-train on other",
        "hardware: the rewards are seconds of that machine.",
        "",
    ]
    cost_path = out / "cost.json"
    if cost_path.exists():
        meta = json.loads(cost_path.read_text())["meta"]
        lines += [
            f"Cost model: {meta.get('model')} on the {meta.get('engine', 'hf')} engine in "
            f"{meta.get('compute', meta.get('dtype'))} on {meta.get('device')}, "
            f"{meta.get('threads')} threads, profiled {meta.get('date')}.",
            "",
        ]
    for method in ("radar", "ltd"):
        record = out / f"{method}-validation.json"
        if not record.exists():
            continue
        data = json.loads(record.read_text())
        v = data["validation"]
        lines += [
            f"## {method}",
            "",
            f"Command: `{data.get('command', '')}` ({data.get('train_s', 0) / 60:.1f} min), acceptance law: "
            f"{data['config'].get('mode', 'greedy')}.",
            "",
        ]
        if data.get("logged"):
            lines += ["Rounds logged with: `" + json.dumps(data["logged"]) + "`", ""]
        lines += ["| offline validation (held-out prompts) | policy | fixed tree |", "|---|---|---|"]
        lines += [
            f"| draft calls per round | {v['draft_calls']:.2f} | {v['fixed_draft_calls']:.2f} |",
            f"| verified tokens per round | {v['verify_size']:.1f} | {data.get('fixed_size', '')} |",
            f"| τ (tokens per round) | {v['tau']:.3f} | {v['fixed_tau']:.3f} |",
            f"| simulated tokens/s | {v['tokens_per_s']:.2f} | {v['fixed_tokens_per_s']:.2f} |",
            f"| speed ratio | {v['speed_ratio']:.3f} | 1 |",
            "",
            f"Policy overhead (measured, included in the simulated times): {data['config']['query_ms']:.3f} ms per "
            + (
                "stop/continue query"
                if method == "radar"
                else f"depth query, {data['config']['size_query_ms']:.3f} ms per size query"
            )
            + ".",
            "",
            "Config: `" + json.dumps(data["config"]) + "`",
            "",
        ]
    write_atomic(out / "README.md", "\n".join(lines))


def profiled_cost(model_name: str) -> Path:
    """The cost model `draftwise profile` left for this model in the user's cache, when there is exactly one."""
    found = sorted((user_policies_dir() / Path(model_name).name).rglob("cost.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise DraftwiseError(f"no cost model for {model_name} yet: run `draftwise profile` first, or pass --cost")
    raise DraftwiseError(f"several cost models for {model_name} ({', '.join(map(str, found))}): pass --cost")


def writable_fit_dir(cost_path: Path) -> Path:
    """Policies go beside their cost model, or, for a shipped one, to the same place in the user's cache: the
    installed package is never written to."""
    shipped = cost_path.resolve().parent
    if shipped.is_relative_to(POLICIES_DIR.resolve()):
        return user_policies_dir() / shipped.relative_to(POLICIES_DIR.resolve())
    return cost_path.parent


def train_policy(args: argparse.Namespace) -> int:
    """Train the `--method` policy on the logged rounds for the cost model, save it with its validation record and a
    card, and print the offline figures; the options are `draftwise train-policy`'s."""
    rounds_dir = Path(args.rounds)
    if not rounds_dir.is_dir():
        raise DraftwiseError(f"no logged rounds at {rounds_dir}; run `draftwise log-rounds --out {rounds_dir}` first")
    cost_path = Path(args.cost) if args.cost else profiled_cost(args.model)
    cost = CostModel.load(cost_path)
    out = Path(args.out) if args.out else writable_fit_dir(cost_path)
    start = time.perf_counter()
    rounds = load_rounds(rounds_dir)
    if args.depth > rounds.depth:
        raise DraftwiseError(f"--depth {args.depth} is deeper than the logged rounds ({rounds.depth})")
    rounds.size_index(args.size)  # the logs must hold the fixed tree's size
    train, validation = rounds.split_by_prompt(0.15, seed=args.seed)
    print(
        f"{len(rounds)} logged rounds from {len(np.unique(rounds.prompt_id))} prompts "
        f"({len(train)} train, {len(validation)} validation); loaded in {time.perf_counter() - start:.1f} s"
    )
    fixed_row = f"fixed d{args.depth} V{args.size}"
    table = baseline_table(validation, cost, args.depth, args.size, args.mode)
    table.update(headroom(train, validation, cost, rounds.depth, args.mode))
    reference = table[fixed_row]["tokens_per_s"]
    if args.baselines_only:
        print(f"offline figures on {len(validation)} held-out rounds ({args.mode}), no policy trained:")
        print_table(table, reference)
        return 0
    if args.method == "radar":
        record = train_radar_command(args, train, validation, cost, out)
    else:
        record = train_ltd_command(args, train, validation, cost, out)
    elapsed = time.perf_counter() - start
    record.update(
        train_s=elapsed,
        command="draftwise " + " ".join(sys.argv[1:]),
        fixed_size=args.size,
        baselines=table,
        rounds={"train": len(train), "validation": len(validation)},
        logged=logged_settings(rounds_dir),
    )
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{args.method}-validation.json", json.dumps(record, indent=2, default=float) + "\n")
    cost_copy = out / "cost.json"
    if args.cost and Path(args.cost).resolve() != cost_copy.resolve():
        cost.save(cost_copy)  # the policy ships with the cost model it was trained for
    write_card(out, args.model)
    print(f"\noffline validation on {len(validation)} held-out rounds ({args.mode}):")
    table[args.method] = record["validation"]
    print_table(table, reference)
    print(f"trained in {elapsed / 60:.1f} min")
    return 0
