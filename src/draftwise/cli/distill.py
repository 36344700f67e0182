"""`draftwise distill`: the target's features and tokens on prompts, the draft head's training data."""

from __future__ import annotations

from pathlib import Path

from draftwise.cli.common import add_model_arg
from draftwise.core.errors import DraftwiseError
from draftwise.targets.models import load_model
from draftwise.training.distill import (
    build_distill_data,
    build_forced_data,
    file_prompts,
    sharegpt_exchanges,
    sharegpt_prompts,
)


def register(commands) -> None:
    parser = commands.add_parser("distill", help="build self-distilled draft-head training data (resumable)")
    add_model_arg(parser)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--mode",
        choices=("generate", "forced"),
        default="generate",
        help="generate: the target answers the prompts (self-distilled); forced: the target reads ShareGPT's own "
        "answers and its greedy prediction at each position is the label (7x cheaper)",
    )
    parser.add_argument("--prompts", default="sharegpt", help="'sharegpt' or a JSONL file ({'prompt'} or {'turns'})")
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0, help="shuffles ShareGPT before --limit")
    parser.add_argument("--offset", type=int, default=0, help="skip this many prompts (exchanges in forced mode) first")
    parser.add_argument("--out", default="runs/distill")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument(
        "--feature-layers",
        default="2,15,27,30",
        help="target hidden_states indices to record (EAGLE-3: low, middle, high; EAGLE-1: the last)",
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    if args.limit < 1 or args.max_new_tokens < 1 or args.batch_size < 1 or args.offset < 0:
        raise DraftwiseError("--limit, --max-new-tokens and --batch-size must be positive, --offset >= 0")
    try:
        layers = tuple(int(x) for x in args.feature_layers.split(","))
    except ValueError as exc:
        raise DraftwiseError(f"--feature-layers takes comma-separated integers, got {args.feature_layers!r}") from exc
    if args.mode == "forced":
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        exchanges = sharegpt_exchanges(args.offset + args.limit, args.seed)[args.offset :]
        count = build_forced_data(model, tokenizer, exchanges, Path(args.out), layers, shard_size=args.shard_size)
        print(f"{count} sequences in {args.out}")
        return 0
    if args.prompts == "sharegpt":
        prompts = sharegpt_prompts(args.limit, args.seed, offset=args.offset)
    elif Path(args.prompts).is_file():
        prompts = file_prompts(Path(args.prompts), args.offset + args.limit)[args.offset :]
    else:
        raise DraftwiseError(f"--prompts must be 'sharegpt' or a JSONL file, got {args.prompts!r}")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    if max(layers) > model.config.num_hidden_layers:
        raise DraftwiseError(f"--feature-layers must be <= {model.config.num_hidden_layers} for this model")
    count = build_distill_data(
        model, tokenizer, prompts, Path(args.out), layers, args.max_new_tokens, args.batch_size, args.shard_size
    )
    print(f"{count} sequences in {args.out}")
    return 0
