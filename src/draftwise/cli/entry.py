"""The `draftwise` command line. Every user mistake ends in one `error:` line and exit code 2."""

from __future__ import annotations

import argparse
import sys

from draftwise.cli import (
    bench,
    chat,
    datastore,
    distill,
    export_head,
    generate,
    log_rounds,
    profile,
    serve,
    train_draft,
    train_policy,
)
from draftwise.core.errors import DraftwiseError

# in the order `draftwise --help` lists them
COMMANDS = (
    generate,
    chat,
    bench,
    serve,
    distill,
    train_draft,
    export_head,
    datastore,
    profile,
    log_rounds,
    train_policy,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="draftwise", description="Lossless speculative decoding with draft trees.")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DraftwiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
