"""`draftwise datastore build`: a REST datastore (draftwise.drafters.retrieval) from a corpus."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from draftwise.cli.common import add_model_arg
from draftwise.core.errors import DraftwiseError
from draftwise.drafters.retrieval import (
    DEFAULT_MAX_TOKENS,
    build_datastore,
    chat_corpus,
    default_datastore_dir,
    jsonl_texts,
    stdlib_sources,
    text_corpus,
)
from draftwise.targets.models import load_tokenizer, resolve_model


def register(commands) -> None:
    parser = commands.add_parser("datastore", help="REST retrieval datastores (suffix arrays over a corpus)")
    actions = parser.add_subparsers(dest="datastore_command", required=True)
    build = actions.add_parser(
        "build",
        help="build a datastore from a corpus",
        description="chat: the target's own responses to ShareGPT prompts (from `draftwise distill`); code: "
        'this Python\'s standard library source; or a JSONL file with one {"text": ...} per line.',
    )
    build.add_argument("--corpus", required=True, help="chat | code | FILE.jsonl")
    build.add_argument("--out", default=None, help="output directory (default: <cache>/datastores/<corpus name>)")
    add_model_arg(build, help="model whose tokenizer the datastore uses")
    build.add_argument("--distill-dir", default="runs/distill", help="distilled data for --corpus chat")
    build.add_argument(
        "--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help=f"token cap (default: {DEFAULT_MAX_TOKENS:,})"
    )
    build.set_defaults(func=run_build)


def _model_vocab_size(model_dir: Path, tokenizer) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    return max(int(config.get("vocab_size", 0)), len(tokenizer))


def run_build(args) -> int:
    if args.max_tokens is not None and args.max_tokens < 1:
        raise DraftwiseError("--max-tokens must be positive")
    corpus = args.corpus
    if corpus not in ("chat", "code"):
        path = Path(corpus)
        if path.suffix != ".jsonl" or not path.is_file():
            raise DraftwiseError(f"--corpus must be 'chat', 'code' or an existing .jsonl file, got {corpus!r}")
    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(str(model_dir))
    vocab_size = _model_vocab_size(model_dir, tokenizer)
    if corpus == "chat":
        sequences = chat_corpus(Path(args.distill_dir))
        name, source = "chat", str(Path(args.distill_dir).resolve())
    elif corpus == "code":
        files = stdlib_sources()
        texts = (p.read_text(encoding="utf-8", errors="replace") for p in files)
        sequences = text_corpus(texts, tokenizer, len(files), "tokenizing stdlib", "file")
        name, source = "code", str(Path(sysconfig.get_paths()["stdlib"]))
    else:
        sequences = text_corpus(jsonl_texts(Path(corpus)), tokenizer, None, "tokenizing", "line")
        name, source = Path(corpus).stem, str(Path(corpus).resolve())
    out = Path(args.out) if args.out else default_datastore_dir(name)
    meta = build_datastore(
        sequences,
        out,
        vocab_size,
        max_tokens=args.max_tokens,
        meta={"model": args.model, "corpus": corpus, "source": source},
    )
    size = sum(meta["bytes"].values())
    print(
        f"datastore '{name}': {meta['num_tokens']:,} tokens from {meta['num_sequences']:,} sequences, "
        f"{size / 2**20:.1f} MiB on disk, built in {meta['build_seconds']:.1f} s -> {out}"
    )
    return 0
