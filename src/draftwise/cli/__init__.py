"""The `draftwise` command line: one module per command, shared arguments in `common`."""

from draftwise.cli.entry import build_parser, main

__all__ = ["build_parser", "main"]
