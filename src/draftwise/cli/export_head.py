"""`draftwise export-head`: a draft head written as an EAGLE-3 (SafeAILab keys) or vLLM speculators checkpoint,
which vLLM's `eagle3` method and SGLang load unchanged."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from draftwise.cli.common import add_model_arg
from draftwise.core.errors import DraftwiseError
from draftwise.heads.formats import EXPORT_FORMATS, export_head, is_native, load_published
from draftwise.heads.load import resolve_head_dir, shipped_head_dir
from draftwise.heads.model import DraftHead
from draftwise.targets.models import resolve_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def register(commands) -> None:
    parser = commands.add_parser("export-head", help="write a draft head as an EAGLE-3 checkpoint that vLLM serves")
    parser.add_argument("out", help="directory to write (replaced as a whole)")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="eagle3 (SafeAILab) | speculators")
    parser.add_argument("--draft-head", default=None, help="head directory or hub id (default: the model's shipped)")
    add_model_arg(parser, help="the target the head drafts for (its config: layer count, context length)")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="dtype of the written weights")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoConfig  # deferred: transformers' auto classes are slow to import

    model_dir = resolve_model(args.model)
    try:
        target_config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise DraftwiseError(f"could not read the config of '{model_dir}': {exc}") from exc
    directory = resolve_head_dir(args.draft_head) if args.draft_head else shipped_head_dir(args.model)
    if directory is None:
        raise DraftwiseError(f"no draft head ships for model '{args.model}': pass --draft-head DIR")
    head = DraftHead.load(directory) if is_native(directory) else load_published(directory, target_config)[0]
    export_head(head, Path(args.out), args.format, target_config, verifier=args.model, dtype=DTYPES[args.dtype])
    print(f"wrote {args.format} head to {args.out}")
    return 0
