"""`draftwise generate`: one reply to one prompt, streamed, with the run's stats."""

from __future__ import annotations

import argparse
import json
import sys

from draftwise.cli.common import add_model_args, add_sampling_args, load_engine, sampling_kwargs
from draftwise.core.errors import DraftwiseError
from draftwise.engine import check_sampling


def register(commands) -> None:
    gen = commands.add_parser("generate", help="generate a reply to one prompt, streaming it")
    gen.add_argument("prompt")
    add_model_args(gen)
    add_sampling_args(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object with the text and stats")
    gen.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    gen.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k)  # before the slow load
    if not args.prompt.strip():
        raise DraftwiseError("the prompt is empty")
    engine = load_engine(args)
    stream = engine.stream(args.prompt, chat_template=not args.no_chat_template, **sampling_kwargs(args))
    for piece in stream:
        if not args.json:
            print(piece, end="", flush=True)
    result = stream.generation
    stats = result.stats
    if args.json:
        record = {
            "text": result.text,
            "model": args.model,
            "engine": engine.engine_name,
            "dtype": engine.dtype_name,
            **stats.summary(),
        }
        print(json.dumps(record, indent=2))
    else:
        print(
            f"\n--- {stats.new_tokens} tokens in {stats.total_s:.2f} s: {stats.tokens_per_s:.1f} tok/s | "
            f"method {stats.method} | rounds {stats.rounds} ({stats.plain_rounds} plain) | "
            f"τ {stats.mean_accepted:.2f} | draft calls {stats.draft_calls} | verified {stats.verified_tokens}",
            file=sys.stderr,
        )
    return 0
