"""`draftwise train-draft`: fit a draft head to `draftwise distill` data (draftwise.training.train_draft)."""

from __future__ import annotations

from draftwise.cli.common import add_model_arg
from draftwise.core.errors import DraftwiseError
from draftwise.training.train_draft import train


def register(commands) -> None:
    parser = commands.add_parser("train-draft", help="train an EAGLE-3-style draft head on `draftwise distill` data")
    add_model_arg(parser)
    parser.add_argument("--data", default="runs/distill", help="distilled data directories, comma-separated")
    parser.add_argument("--out", default="runs/draft-head")
    parser.add_argument("--feature-layers", default="2,15,27", help="fused target layers (one layer = EAGLE-1 style)")
    parser.add_argument("--draft-vocab", type=int, default=8192, help="reduced draft vocabulary size")
    parser.add_argument("--ttt-steps", type=int, default=4, help="unrolled prediction steps (training-time test)")
    parser.add_argument(
        "--soft-labels",
        type=float,
        default=0.0,
        help="share of the loss matched to the target's full distribution (needs the final layer's features)",
    )
    parser.add_argument("--init-head", default="", help="start from this trained head instead of the target's layer")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--accumulate", type=int, default=4, help="sequences per optimizer step")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--max-len", type=int, default=768)
    parser.add_argument("--holdout-every", type=int, default=20, help="every n-th sequence is held out")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--max-minutes", type=float, default=0, help="stop (resumably) after this much training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="auto: bf16 autocast where the CPU has bf16 units",
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    positive = ("epochs", "accumulate", "holdout_every", "ttt_steps", "draft_vocab", "eval_every", "checkpoint_every")
    for name in positive:
        if getattr(args, name) < 1:
            raise DraftwiseError(f"--{name.replace('_', '-')} must be positive")
    if not 0 <= args.soft_labels <= 1:
        raise DraftwiseError("--soft-labels must be between 0 and 1")
    if args.max_len < 8:
        raise DraftwiseError("--max-len must be at least 8")
    train(args)
    return 0
