"""`draftwise serve`: the OpenAI-compatible HTTP server (draftwise.server) around one engine."""

from __future__ import annotations

import argparse
import sys

from draftwise.cli.common import add_model_args, load_engine
from draftwise.core.errors import DraftwiseError


def register(commands) -> None:
    parser = commands.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument(
        "--max-queue",
        type=int,
        default=16,
        help="requests that may wait behind the running one; more get HTTP 429 (default: 16)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:  # the server's packages are the optional [serve] extra: imported only when the command runs
        from draftwise.server.app import create_app, listen, run_server
    except ImportError as exc:
        raise DraftwiseError(f"`draftwise serve` needs `pip install 'draftwise[serve]'` ({exc})") from exc
    if args.max_queue < 1:
        raise DraftwiseError(f"--max-queue must be >= 1, got {args.max_queue}")
    sock = listen(args.host, args.port)
    app = create_app(lambda: load_engine(args), max_queue=args.max_queue)  # loads on the worker thread
    port = sock.getsockname()[1]
    print(
        f"[draftwise] serving {args.model} (method {args.method}) at http://{args.host}:{port}/v1",
        file=sys.stderr,
        flush=True,
    )
    run_server(app, sock)
    return 0
