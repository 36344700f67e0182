"""`draftwise serve`: the OpenAI-compatible HTTP server (draftwise.server) around one engine."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from contextlib import suppress
from typing import TYPE_CHECKING

from draftwise.cli.common import add_model_args, load_engine
from draftwise.core.errors import DraftwiseError

if TYPE_CHECKING:
    from draftwise.server.schemas import Limits

# The flags' defaults: server.schemas.Limits' own and its DEFAULT_MAX_TOKENS, repeated because the server's
# packages are imported only when the command runs (tests/server/test_serve_hardening.py checks they agree).
DEFAULT_MAX_TOKENS = 256
LIMIT_DEFAULTS = {
    "max_body_bytes": 4 * 2**20,
    "max_prompt_chars": 200_000,
    "max_tokens": 4096,
    "request_timeout": 300.0,
    "queue_timeout": 120.0,
}


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
    group = parser.add_argument_group("access and limits")
    group.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` on every endpoint but /health (default: $DRAFTWISE_API_KEY; "
        "unset: no key). Prefer the environment variable: other users can read command lines",
    )
    group.add_argument(
        "--allowed-methods",
        default=None,
        metavar="M1,M2",
        help="methods a request may choose with `method` (default: --method and ar); --method is always allowed. "
        "draft-model loads a second full model, so only list it if you mean to",
    )
    group.add_argument(
        "--max-tokens",
        type=int,
        default=LIMIT_DEFAULTS["max_tokens"],
        help="most tokens one request may generate: a request asking for more gets HTTP 400, not a silently "
        f"shorter answer; one asking for none gets min({DEFAULT_MAX_TOKENS}, this) "
        f"(default: {LIMIT_DEFAULTS['max_tokens']})",
    )
    group.add_argument(
        "--max-prompt-chars",
        type=int,
        default=LIMIT_DEFAULTS["max_prompt_chars"],
        help="most characters of prompt or message content per request, checked before tokenising; more gets "
        f"HTTP 400 (default: {LIMIT_DEFAULTS['max_prompt_chars']})",
    )
    group.add_argument(
        "--max-body-bytes",
        type=int,
        default=LIMIT_DEFAULTS["max_body_bytes"],
        help=f"largest request body; larger gets HTTP 413 (default: {LIMIT_DEFAULTS['max_body_bytes']}, 4 MiB)",
    )
    group.add_argument(
        "--request-timeout",
        type=float,
        default=LIMIT_DEFAULTS["request_timeout"],
        help="seconds a generation may run: then it stops and answers the text so far with finish_reason "
        f"'length', as if max_tokens had been reached; 0 = no limit (default: {LIMIT_DEFAULTS['request_timeout']:g})",
    )
    group.add_argument(
        "--queue-timeout",
        type=float,
        default=LIMIT_DEFAULTS["queue_timeout"],
        help="seconds a request may wait for the model before it starts: then HTTP 503 with Retry-After; "
        f"0 = no limit (default: {LIMIT_DEFAULTS['queue_timeout']:g})",
    )
    parser.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    with suppress(ValueError):
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    return False


def limits_from(args: argparse.Namespace) -> Limits:
    """The serve flags as Limits, refused with a DraftwiseError (exit 2) before the model loads."""
    from draftwise.server.schemas import Limits

    for flag, value, low in [
        ("--max-queue", args.max_queue, 1),
        ("--max-body-bytes", args.max_body_bytes, 1),
        ("--max-prompt-chars", args.max_prompt_chars, 1),
        ("--max-tokens", args.max_tokens, 1),
        ("--request-timeout", args.request_timeout, 0),
        ("--queue-timeout", args.queue_timeout, 0),
    ]:
        if not value >= low:  # NaN too
            raise DraftwiseError(f"{flag} must be >= {low}, got {value}")
    if args.max_tokens > 1_000_000:
        raise DraftwiseError(f"--max-tokens must be <= 1000000, got {args.max_tokens}")
    allowed = None if args.allowed_methods is None else frozenset(filter(None, args.allowed_methods.split(",")))
    limits = Limits(
        max_body_bytes=args.max_body_bytes,
        max_prompt_chars=args.max_prompt_chars,
        max_tokens=args.max_tokens,
        request_timeout=args.request_timeout or None,
        queue_timeout=args.queue_timeout or None,
        allowed_methods=allowed,
    )
    limits.methods_for(args.method)  # unknown names fail now, not after the model has loaded
    return limits


def api_key_from(args: argparse.Namespace) -> str | None:
    key = args.api_key if args.api_key is not None else os.environ.get("DRAFTWISE_API_KEY") or None
    if key is not None and (not key.strip() or key != key.strip()):
        raise DraftwiseError("the API key must not be empty nor start or end with whitespace")
    return key


def run(args: argparse.Namespace) -> int:
    try:  # the server's packages are the optional [serve] extra: imported only when the command runs
        from draftwise.server.app import create_app, listen, run_server
    except ImportError as exc:
        raise DraftwiseError(f"`draftwise serve` needs `pip install 'draftwise[serve]'` ({exc})") from exc
    limits, api_key = limits_from(args), api_key_from(args)
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    if api_key is None and not is_loopback(host):
        print(
            f"[draftwise] warning: listening on {host} without an API key: anyone who can reach port {port} can "
            "use the model; set DRAFTWISE_API_KEY (or --api-key)",
            file=sys.stderr,
            flush=True,
        )
    try:  # the engine loads on the worker thread
        app = create_app(lambda: load_engine(args), max_queue=args.max_queue, api_key=api_key, limits=limits)
    except BaseException:
        sock.close()
        raise
    print(
        f"[draftwise] serving {args.model} (method {args.method}) at http://{args.host}:{port}/v1"
        + (" (API key required)" if api_key else ""),
        file=sys.stderr,
        flush=True,
    )
    run_server(app, sock)
    return 0
