"""`draftwise train-policy --method radar|ltd`: a tree policy trained on logged rounds for this machine's cost model
(draftwise.training.train_policy)."""

from __future__ import annotations

import argparse

import torch

from draftwise.cli.common import add_model_arg
from draftwise.core.errors import DraftwiseError
from draftwise.drafters.eagle import EAGLE2_TREE
from draftwise.training.train_policy import train_policy


def register(commands) -> None:
    parser = commands.add_parser("train-policy", help="train a RADAR or LTD tree policy on logged rounds")
    parser.add_argument("--method", required=True, help="radar | ltd")
    add_model_arg(parser)
    parser.add_argument("--rounds", default="runs/policy-rounds", help="directory written by `draftwise log-rounds`")
    parser.add_argument("--cost", default=None, help="cost model JSON (default: data/policies/<model>/cost.json)")
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (default: the --cost file's directory, else data/policies/<model>/)",
    )
    parser.add_argument("--mode", default="greedy", help="acceptance law to train for: greedy | sampling")
    parser.add_argument(
        "--depth", type=int, default=EAGLE2_TREE["depth"], help="the fixed tree's expansion calls (RADAR's maximum)"
    )
    parser.add_argument("--size", type=int, default=EAGLE2_TREE["total_tokens"], help="the fixed tree's verified nodes")
    parser.add_argument(
        "--alphas", default="0.001,0.002,0.005,0.01,0.02,0.04", help="RADAR: per-continue penalties tried"
    )
    parser.add_argument("--epochs", type=int, default=100, help="RADAR: epochs per α")
    parser.add_argument(
        "--max-tau-loss",
        type=float,
        default=0.01,
        help="RADAR: keep the fastest α whose validation τ is within this fraction of the fixed tree's",
    )
    parser.add_argument("--max-depth", type=int, default=8, help="LTD: most expansion calls")
    parser.add_argument("--sizes", default=None, help="LTD: verification sizes to choose from (default: logged)")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="LTD: scale every stage's PPO steps")
    parser.add_argument(
        "--baselines-only",
        action="store_true",
        help="print the baselines and the headroom (hindsight oracle, confidence bins) and train nothing",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.method not in ("radar", "ltd"):
        raise DraftwiseError(f"unknown policy method '{args.method}'; choose radar or ltd")
    if args.mode not in ("greedy", "sampling"):
        raise DraftwiseError("--mode must be greedy or sampling")
    if not 0 <= args.max_tau_loss < 1:
        raise DraftwiseError("--max-tau-loss must be in [0, 1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    return train_policy(args)
