"""Arguments that several commands share, named once: the model (`add_model_arg`), the model with the method and
engine (`add_model_args`), and sampling (`add_sampling_args`)."""

from __future__ import annotations

import argparse

from draftwise.core.errors import DraftwiseError
from draftwise.engine import Engine
from draftwise.methods import METHOD_HELP, METHODS
from draftwise.policies.load import POLICY_NAMES
from draftwise.targets.models import DEFAULT_MODEL


def add_model_arg(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """--model, defaulting to the embedded model."""
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=help
        or f"embedded model name ({DEFAULT_MODEL}, the default), local HF model directory, local .gguf file, or "
        "Hugging Face hub id such as Qwen/Qwen2.5-0.5B-Instruct (downloaded once into the HF cache, safetensors only)",
    )


def add_model_args(parser: argparse.ArgumentParser, method_default: str = "pld") -> None:
    """--model / --method / --dtype / --device, the drafter knobs and --backoff, shared by every command that loads
    a model."""
    add_model_arg(parser)
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
        help="auto | lean | hf | llama: who runs the target. lean = draftwise's compact PyTorch path for "
        "Llama, Mistral, Qwen2/2.5 and Qwen3 models (static KV cache; on CPU the embedded GGUF's 4-bit weights stay "
        "4-bit); hf = transformers, for any model; llama = llama.cpp on a GGUF (needs `pip install "
        "'draftwise[llama]'`, no hidden features). "
        "auto = lean where it applies, else hf (with a notice)",
    )
    parser.add_argument("--draft-model", default=None, help="draft model for --method draft-model")
    parser.add_argument(
        "--draft-head",
        default=None,
        help="draft head for the eagle-family methods: a directory or hub id, in draftwise's format or EAGLE-1, "
        "EAGLE-3 or speculators (default: shipped)",
    )
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
        default="off",
        help="on: a round where speculation is not expected to pay (measured per generation) verifies the root "
        "alone, as plain decoding does, and speculation is probed again later; off: always speculate (default: off, "
        "until it is measured not to cost where speculation pays: docs/backoff.md)",
    )


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """--max-new-tokens and the sampling parameters, shared by every command that generates."""
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--seed", type=int, default=None)


def method_options(args: argparse.Namespace) -> dict:
    """The drafter options among `add_model_args`' options, for Engine.load."""
    options = {"total_tokens": args.total_tokens, "depth": args.depth, "top_k": args.top_k_draft}
    if args.method == "draft-model":
        options["draft_model"] = args.draft_model
    if args.draft_head is not None:
        options["draft_head"] = args.draft_head
    if getattr(args, "policy", None) is not None:
        if args.policy not in POLICY_NAMES:
            raise DraftwiseError(f"unknown policy '{args.policy}'; choose one of {', '.join(POLICY_NAMES)}")
        if args.method not in ("eagle", "rasd"):
            raise DraftwiseError("--policy applies to --method eagle and rasd (radar and ltd bring their own)")
        options["policy"] = args.policy
    if args.datastore is not None:
        options["datastore"] = args.datastore
    return {k: v for k, v in options.items() if v is not None}


def load_engine(args: argparse.Namespace) -> Engine:
    """The engine that `add_model_args`' options describe."""
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
    """`add_sampling_args`' options as Engine.stream's keyword arguments."""
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
