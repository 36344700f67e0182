"""`draftwise log-rounds`: full-depth eagle rounds logged for training tree policies (draftwise.training.log_rounds)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from draftwise.cli.common import add_model_arg
from draftwise.core.errors import DraftwiseError
from draftwise.policies.learn.logger import DEFAULT_SIZES, LOG_DEPTH, LOG_TOP_K
from draftwise.training.log_rounds import log_rounds


def register(commands) -> None:
    parser = commands.add_parser("log-rounds", help="log full-depth eagle rounds for training tree policies")
    add_model_arg(parser)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--draft-head", default=None, help="draft head directory (default: shipped)")
    parser.add_argument("--out", default="runs/policy-rounds")
    parser.add_argument("--sharegpt", type=int, default=48, help="ShareGPT training prompts (past the head's)")
    parser.add_argument("--gsm", type=int, default=16, help="GSM-style prompts (reasoning-gym, if installed)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="verification sizes V")
    parser.add_argument("--depth", type=int, default=LOG_DEPTH, help="expansion calls per logged round")
    parser.add_argument("--top-k", type=int, default=LOG_TOP_K, help="frontier width")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling law of the logged acceptance")
    parser.add_argument(
        "--trajectory",
        default="greedy",
        help="the logged text: greedy, or sampled from the --temperature law (for policies that serve sampling)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sizes = tuple(sorted({int(s) for s in args.sizes.split(",")}))
    if not sizes or sizes[0] < 1:
        raise DraftwiseError("--sizes must be positive integers")
    if args.depth < 1 or args.top_k < 1 or args.max_new_tokens < 1:
        raise DraftwiseError("--depth, --top-k and --max-new-tokens must be >= 1")
    if args.temperature <= 0:
        raise DraftwiseError("--temperature (the sampling law whose acceptance is logged) must be > 0")
    if args.trajectory not in ("greedy", "sampled"):
        raise DraftwiseError("--trajectory must be greedy or sampled")
    if args.threads:
        torch.set_num_threads(args.threads)
    total = log_rounds(
        Path(args.out),
        args.model,
        args.dtype,
        args.draft_head,
        args.sharegpt,
        args.gsm,
        args.max_new_tokens,
        sizes,
        args.depth,
        args.top_k,
        args.temperature,
        args.trajectory,
    )
    print(f"logged {total} new rounds into {args.out}")
    return 0
