"""`draftwise chat`: an interactive multi-turn chat in the terminal."""

from __future__ import annotations

import argparse
import sys

from draftwise.cli.common import add_model_args, add_sampling_args, load_engine, sampling_kwargs
from draftwise.core.errors import DraftwiseError
from draftwise.engine import check_sampling


def register(commands) -> None:
    chat = commands.add_parser("chat", help="interactive multi-turn chat in the terminal")
    add_model_args(chat)
    add_sampling_args(chat)
    chat.set_defaults(func=run)


def fit_history(engine, messages: list[dict[str, str]], max_new_tokens: int) -> int:
    """Drop the oldest turns (in place) until the conversation leaves room for a reply in the context window;
    returns how many messages went. Raises DraftwiseError when the newest message alone does not fit."""
    room = min(max_new_tokens, engine.target.max_length // 4)  # a reply of at least this many tokens
    dropped = 0
    while True:
        try:
            if len(engine.encode(messages)) + room <= engine.target.max_length:
                return dropped
        except DraftwiseError:
            if len(messages) == 1:
                raise
        if len(messages) == 1:
            return dropped  # the newest message fits, with less room for the reply
        cut = 2 if len(messages) > 2 else 1  # a user turn and its answer
        del messages[:cut]
        dropped += cut


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
        try:
            dropped = fit_history(engine, messages, args.max_new_tokens)
        except DraftwiseError as exc:  # this message alone does not fit: say so and keep the conversation
            print(f"error: {exc}", file=sys.stderr)
            messages.pop()
            continue
        if dropped:
            print(
                f"[dropped the oldest {dropped} messages: the conversation outgrew the context window]", file=sys.stderr
            )
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
