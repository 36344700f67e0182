"""`draftwise chat`: an interactive multi-turn chat in the terminal."""

from __future__ import annotations

import argparse
import sys

from draftwise.cli.common import add_model_args, add_sampling_args, load_engine, sampling_kwargs
from draftwise.engine import check_sampling


def register(commands) -> None:
    chat = commands.add_parser("chat", help="interactive multi-turn chat in the terminal")
    add_model_args(chat)
    add_sampling_args(chat)
    chat.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
    engine = load_engine(args)
    messages: list[dict[str, str]] = []
    print("draftwise chat: empty line or Ctrl-D to quit, /reset to start over", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line.strip():
            return 0
        if line.strip() == "/reset":
            messages = []
            continue
        messages.append({"role": "user", "content": line})
        stream = engine.stream(messages, **sampling_kwargs(args))
        try:
            for piece in stream:
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr)
            messages.pop()
            continue
        stats = stream.generation.stats
        print(f"\n[{stats.tokens_per_s:.1f} tok/s, τ {stats.mean_accepted:.2f}]", file=sys.stderr)
        messages.append({"role": "assistant", "content": stream.generation.text})
