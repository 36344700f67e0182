"""The `draftwise` command line. Every user mistake ends in one `error:` line and exit code 2."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from draftwise.drafters import METHOD_HELP
from draftwise.errors import DraftwiseError
from draftwise.models import DEFAULT_MODEL


def add_model_args(parser: argparse.ArgumentParser, method_default: str = "pld") -> None:
    """--model / --method / --dtype / --device and the drafter knobs, shared by every command that loads a model."""
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"embedded model name or local HF model directory (default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--method",
        default=method_default,
        help="; ".join(f"{k}: {v}" for k, v in METHOD_HELP.items()) + f" (default: {method_default})",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto | bf16 | fp32 | fp16 (auto: bf16 where the hardware multiplies it natively, else fp32)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--engine",
        default="auto",
        help="auto | lean | hf | llama: who runs the target. lean = draftwise's compact PyTorch path for llama "
        "models (static KV cache; on CPU the embedded GGUF's 4-bit weights stay 4-bit); hf = transformers, "
        "for any model; llama = llama.cpp on the GGUF (needs `pip install 'draftwise[llama]'`, no hidden features). "
        "auto = lean where it applies, else hf",
    )
    parser.add_argument("--draft-model", default=None, help="draft model for --method draft-model")
    parser.add_argument("--draft-head", default=None, help="draft head directory for --method eagle (default: shipped)")
    parser.add_argument("--datastore", default=None, help="retrieval datastore name or directory for --method rest")
    parser.add_argument("--total-tokens", type=int, default=None, help="tree size verified per round")
    parser.add_argument("--depth", type=int, default=None, help="draft depth (expansion calls)")
    parser.add_argument(
        "--top-k-draft", type=int, default=None, dest="top_k_draft", help="children per expanded node in dynamic trees"
    )
    parser.add_argument(
        "--policy",
        default=None,
        help="tree policy for --method eagle or rasd, how deep to draft and how much to verify each round: "
        "fixed | threshold | heuristic | radar | ltd",
    )
    parser.add_argument(
        "--backoff",
        choices=("on", "off"),
        default="on",
        help="on: a round where speculation is not expected to pay (measured per generation) verifies the root "
        "alone, as plain decoding does, and speculation is probed again later; off: always speculate (default: on)",
    )


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--seed", type=int, default=None)


def method_options(args: argparse.Namespace) -> dict:
    options = {"total_tokens": args.total_tokens, "depth": args.depth, "top_k": args.top_k_draft}
    if args.method == "draft-model":
        options["draft_model"] = args.draft_model
    if args.draft_head is not None:
        options["draft_head"] = args.draft_head
    if getattr(args, "policy", None) is not None:
        from draftwise.policies import POLICY_NAMES

        if args.policy not in POLICY_NAMES:
            raise DraftwiseError(f"unknown policy '{args.policy}'; choose one of {', '.join(POLICY_NAMES)}")
        if args.method not in ("eagle", "rasd"):
            raise DraftwiseError("--policy applies to --method eagle and rasd (radar and ltd bring their own)")
        options["policy"] = args.policy
    if args.datastore is not None:
        options["datastore"] = args.datastore
    return {k: v for k, v in options.items() if v is not None}


def load_engine(args: argparse.Namespace):
    from draftwise.drafters import METHODS
    from draftwise.engine import Engine

    if args.method not in METHODS:  # before the slow load
        raise DraftwiseError(f"unknown method '{args.method}'; choose one of {', '.join(METHODS)}")

    return Engine.load(
        args.model,
        method=args.method,
        dtype=args.dtype,
        device=args.device,
        engine=args.engine,
        backoff=args.backoff,
        **method_options(args),
    )


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from draftwise.engine import check_sampling

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


def cmd_chat(args: argparse.Namespace) -> int:
    from draftwise.engine import check_sampling

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="draftwise", description="Lossless speculative decoding with draft trees.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate a reply to one prompt, streaming it")
    gen.add_argument("prompt")
    add_model_args(gen)
    add_sampling_args(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object with the text and stats")
    gen.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    gen.set_defaults(func=cmd_generate)

    chat = commands.add_parser("chat", help="interactive multi-turn chat in the terminal")
    add_model_args(chat)
    add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    for name in EXTRA_COMMANDS:
        importlib.import_module(name).register(commands)
    return parser


# modules with register(subparsers)
EXTRA_COMMANDS = (
    "draftwise.bench",
    "draftwise.serve",
    "draftwise.training.distill",
    "draftwise.training.train_draft",
    "draftwise.retrieval",
    "draftwise.profile",
    "draftwise.policies.logger",
    "draftwise.policies.train",
)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DraftwiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
