"""`draftwise profile`: this machine's round cost model, for training tree policies (draftwise.training.profiling)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from draftwise.cli.common import add_model_arg
from draftwise.core.errors import DraftwiseError
from draftwise.core.target import ComputeMode
from draftwise.integrations.vllm import CLASS_PATH
from draftwise.policies.cost import default_cost_path
from draftwise.training.profile_vllm import default_vllm_dir, fit_log, profile_vllm
from draftwise.training.profiling import profile


def register(commands) -> None:
    parser = commands.add_parser("profile", help="measure this machine's round cost model (for tree policies)")
    add_model_arg(parser)
    parser.add_argument("--dtype", default="auto", help="auto | bf16 | fp32 (default: auto, what generation uses)")
    parser.add_argument(
        "--engine",
        default="auto",
        help="auto | lean | hf: the engine whose costs to measure; vllm: fit vLLM's step time, the learned draft "
        "length and the per-batch-size schedule of the vLLM proposer (docs/vllm.md)",
    )
    parser.add_argument("--k-max", type=int, default=6, help="vllm: the longest draft logged and scheduled")
    parser.add_argument("--datastore", default=None, help="vllm: a REST datastore the proposer also drafts from")
    parser.add_argument(
        "--from-log", type=Path, default=None, help="vllm: re-fit to a proposer log (rounds.jsonl) without running vLLM"
    )
    parser.add_argument("--draft-head", default=None, help="draft head directory (default: shipped)")
    parser.add_argument(
        "--out",
        default=None,
        help="JSON path (default: data/policies/<model>/[<compute>/]cost.json, where `--method radar|ltd` look for "
        "the policies of a target computing in <compute>)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (the fastest counts)")
    parser.add_argument(
        "--prompts", type=int, default=8, help="generations of random tree shapes, to fit what real rounds add"
    )
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise DraftwiseError("--repeats must be >= 1")
    if args.engine == "vllm":
        return run_vllm(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = (args.draft_head, args.repeats, args.prompts, args.max_new_tokens)
    cost = profile(args.model, args.dtype, *options, engine_name=args.engine)
    out = Path(args.out) if args.out else default_cost_path(args.model, ComputeMode.parse(cost.meta["compute"]))
    cost.save(out)
    print(
        f"in real rounds: overhead {cost.round_overhead_ms:.2f} ms, +{cost.call_extra_ms:.3f} ms a draft call, "
        f"+{cost.node_extra_ms:.3f} ms a verified node"
    )
    for name, ms in cost.policy_query_ms.items():
        print(f"policy query, {name}: {ms:.3f} ms")
    for width in (1, 3, 8):
        print(f"head call, width {width:>2}, context 300: {cost.head(width, 300):6.2f} ms")
    for n in (1, 2, 4, 8, 16, 32, 64):
        print(f"verify N={n:>2}, context 300: {cost.verify(n, 300):6.1f} ms")
    print(f"saved {out}; fit policies to it with `draftwise train-policy --method radar|ltd --cost {out}`")
    return 0


def run_vllm(args: argparse.Namespace) -> int:
    if not 1 <= args.k_max <= 16:
        raise DraftwiseError("--k-max must be between 1 and 16")
    dtype = {"auto": "bfloat16", "bf16": "bfloat16", "fp32": "float32"}.get(args.dtype, args.dtype)
    out = Path(args.out) if args.out else None
    if args.from_log:
        path, schedule = fit_log(args.from_log, out or default_vllm_dir(args.model), args.k_max)
    else:
        path, schedule = profile_vllm(
            args.model, args.k_max, dtype, args.max_new_tokens, args.prompts * 2, args.datastore, out
        )
    config = {
        "method": "custom_class",
        "model": CLASS_PATH,
        "num_speculative_tokens": args.k_max,
        "num_speculative_tokens_per_batch_size": schedule,
    }
    print(f"schedule (batch sizes from, to, draft length): {schedule}")
    print("tokens/s on the logged drafts (fixed k, learned length, an oracle that knows each verdict):")
    for batch, rates in json.loads(path.read_text())["meta"]["offline_tokens_per_s"].items():
        print(f"  batch {batch}: " + ", ".join(f"{name} {rate}" for name, rate in rates.items()))
    print(f"saved {path} and {path.parent / 'schedule.json'}; serve with the learned length:")
    print(f'  DRAFTWISE_VLLM=\'{{"length": "learned", "policy": "{path}"}}\' \\')
    print(f"  vllm serve {args.model} --speculative-config '{json.dumps(config)}'")
    return 0
