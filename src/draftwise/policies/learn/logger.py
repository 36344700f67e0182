"""The round logger: an exact offline simulator of every truncated draft tree, for training tree policies.

Each round runs eagle drafting at full depth D and keeps the whole candidate tree. A policy could have stopped
after any L <= D expansion calls and verified any size V, and the tree it would have verified is the best V
nodes of the first L calls' candidates (EAGLE-2's rerank). The union of those trees over every L and every
V <= max size is verified in one target forward, and per union node we store the verdict:

- `correct`: its token is the target's argmax after its parent (greedy acceptance);
- `p`: the target's probability of its token after its parent, under the logged sampling law.

A node's logits depend only on its own path (tree attention), so these verdicts hold in any tree containing
the node, and the accepted length of every truncation is exact offline (offline.py): greedy from `correct`,
and for sampling the whole acceptance-length law (RADAR's P_L: a node is reached with the product of `p` on
its path; see ../shared/papers/radar.md §4.3). The trajectory continues greedily on the union's verdict, so
the logged text is plain greedy decoding's, or (`--trajectory sampled`) by rejection sampling under the logged
law, so the logged contexts are the text a sampling policy will see (at T = 1 the target is less sure of its own
sampled text than of its greedy text: on greedy contexts the offline τ of the fixed d3 V6 tree was 1.64, in the
T = 1 bench 1.44).

Training prompts only: ShareGPT first turns past the 3000 the draft head trained on, plus GSM-style problems
from reasoning-gym (a different seed from the benchmark's, its questions excluded). Never MT-bench,
HumanEval, Spec-Bench or AlpacaEval. One Parquet part per prompt, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from draftwise.core.drafter import DraftContext, RoundResult
from draftwise.core.errors import DraftwiseError
from draftwise.core.tree import DraftTree
from draftwise.core.verify import Sampling, accept_greedy, accept_sampling, rows_on_demand, target_probs
from draftwise.drafters.eagle import EagleDrafter, TreePolicy
from draftwise.targets.hf import TargetModel

DEFAULT_SIZES = (1, 2, 4, 6, 8, 10, 12, 16, 24, 32)  # verification sizes V (root included) the logs can answer for
LOG_DEPTH, LOG_TOP_K = 8, 8
T1 = Sampling(1.0)  # the law whose acceptance probabilities are logged by default (RADAR's)
SHAREGPT_SKIP = 3000  # the draft head's training prompts


def prefix_size(calls: int, top_k: int) -> int:
    """Nodes of a candidate tree after `calls` expansion calls: root, k first-level nodes, k*k per call."""
    return 1 + top_k + calls * top_k * top_k


def selection_order(tree: DraftTree) -> Tensor:
    """Node indices in DraftTree.select_top's ranking (root, then lowest score on the root path descending,
    then depth, then index), so the first V of the candidates of any prefix are that prefix's select_top(V)."""
    path_min = torch.where(tree.ancestors, tree.scores[None, :], torch.inf).min(1).values
    path_min[0] = torch.inf
    order = torch.arange(tree.size)
    order = order[tree.depths[order].sort(stable=True).indices]
    return order[(-path_min[order]).sort(stable=True).indices]


def truncation_union(candidates: DraftTree, top_k: int, depth: int, max_size: int) -> Tensor:
    """Sorted indices of every node some truncation (L <= depth calls, V <= max_size nodes) would verify."""
    order = selection_order(candidates)
    keep = torch.zeros(candidates.size, dtype=torch.bool)
    for calls in range(depth + 1):
        keep[order[order < prefix_size(calls, top_k)][:max_size]] = True
    return keep.nonzero().flatten()


class _Capture(TreePolicy):
    """Full depth; remembers the round's context length and candidate tree."""

    def __init__(self) -> None:
        self.context = 0
        self.candidates: DraftTree | None = None

    def begin_round(self, committed: int):
        self.context, self.candidates = committed, None
        return None

    def verify_size(self, candidates: DraftTree, budget: int) -> int:
        self.candidates = candidates
        return 1


def round_record(
    candidates: DraftTree, union_index: Tensor, logits: Tensor, sampling: Sampling, context: int, top_k: int
) -> dict:
    """One logged round: every candidate's score (the policies' observations) and the verdict on the union."""
    union = candidates.subtree(union_index)
    parents = union.parents
    probs = target_probs(logits, sampling)
    best = logits.argmax(-1)
    correct = torch.ones(union.size, dtype=torch.bool)
    correct[1:] = union.tokens[1:] == best[parents[1:]]
    p = torch.ones(union.size)
    p[1:] = probs[parents[1:], union.tokens[1:]]
    key = torch.where(union.ancestors, union.scores[None, :], torch.inf).min(1).values
    key[0] = 0.0
    return {
        "context": context,
        "top_k": top_k,
        "level_scores": candidates.scores[1:].tolist(),
        "node_index": union_index.tolist(),
        "node_parent": parents.tolist(),
        "node_depth": union.depths.tolist(),
        "node_key": key.tolist(),
        "node_correct": correct.tolist(),
        "node_p": p.tolist(),
    }


def log_generation(
    target: TargetModel,
    drafter: EagleDrafter,
    prompt_ids: list[int],
    max_new_tokens: int,
    sizes: tuple[int, ...] = DEFAULT_SIZES,
    law: Sampling = T1,
    stop_token_ids: frozenset[int] = frozenset(),
    before_verify: Callable[[DraftTree, int], None] | None = None,
    sampled: torch.Generator | None = None,
) -> Iterator[dict]:
    """Decoding that yields one record per round (see round_record). `law` is the sampling law whose
    acceptance probabilities are stored. The text is greedy, or sampled from `law` when `sampled` (the draws'
    generator) is given. `before_verify(candidates, context)` is a test hook."""
    capture = _Capture()
    drafter.policy = capture
    target.feature_layers = drafter.feature_layers
    tokens = torch.tensor(prompt_ids, dtype=torch.long)
    drafter.begin(tokens[:-1], target.prefill(tokens[:-1]))
    new, last_accepted, greedy = 0, 0, Sampling()
    while new < max_new_tokens and tokens.numel() < target.max_length:
        root = int(tokens[-1])
        budget = target.max_length - tokens.numel()
        drafter.propose(DraftContext(tokens, len(prompt_ids), greedy, budget=max(budget, 1)))
        candidates = capture.candidates
        if candidates is None:  # nothing to condition on yet: verify the root alone, log nothing
            union_index, union = torch.zeros(1, dtype=torch.long), DraftTree.root_only(root)
        else:
            union_index = truncation_union(candidates, drafter.top_k, drafter.depth, max(sizes))
            union = candidates.subtree(union_index)
            if union.size > budget:  # the context window is nearly full: verify what fits, log nothing
                union, candidates = union.select_top(budget), None
        if before_verify is not None and candidates is not None:
            before_verify(candidates, capture.context)
        past = target.length
        out = target.forward_tree(union)
        if sampled is None:
            path, bonus = accept_greedy(union, out.logits)
        else:
            path, bonus = accept_sampling(union, rows_on_demand(out.logits, law), sampled)
        if candidates is not None:
            record = round_record(candidates, union_index, out.logits, law, capture.context, drafter.top_k)
            record.update(accepted=len(path) - 1, last_accepted=last_accepted)
            yield record
        target.commit(past, path)
        drafter.observe(RoundResult(union, path, bonus, out.features[path] if out.features is not None else None))
        committed = union.tokens[path[1:]].tolist() + [bonus]
        last_accepted = len(committed)
        tokens = torch.cat([tokens, torch.tensor(committed, dtype=torch.long)])
        new += len(committed)
        if any(t in stop_token_ids for t in committed):
            break


def training_prompts(sharegpt: int, gsm: int, seed: int = 0) -> list[tuple[str, str]]:
    """(source, prompt) pairs for logging: ShareGPT past the head's training slice, then GSM-style problems."""
    from draftwise.training.distill import untrained_sharegpt_prompts

    prompts = [("sharegpt", p) for p in untrained_sharegpt_prompts(SHAREGPT_SKIP, sharegpt)]
    if gsm > 0:
        try:
            import reasoning_gym
        except ModuleNotFoundError:
            return prompts
        from draftwise.bench.datasets import gsm as benchmark_gsm

        held_out = {q.turns[0] for q in benchmark_gsm(1000)}  # the benchmark's problems (seed 0)
        dataset = reasoning_gym.create_dataset("gsm_symbolic", size=gsm * 2, seed=1234 + seed)
        fresh = [item["question"] for item in dataset if item["question"] not in held_out]
        prompts += [("gsm", q) for q in fresh[:gsm]]
    return prompts


def write_part(path: Path, records: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pylist(records), tmp, compression="zstd")
    tmp.replace(path)


def log_rounds(
    out: Path,
    model: str,
    dtype: str,
    draft_head: str | None,
    sharegpt: int,
    gsm: int,
    max_new_tokens: int,
    sizes: tuple[int, ...],
    depth: int,
    top_k: int,
    temperature: float,
    trajectory: str = "greedy",
) -> int:
    """Log rounds for every training prompt into `out` (one part per prompt; existing parts are kept)."""
    from tqdm import tqdm

    from draftwise.drafters.eagle import load_head
    from draftwise.engine import Engine

    settings = {
        "model": model,
        "dtype": dtype,
        "draft_head": draft_head or "shipped",
        "max_new_tokens": max_new_tokens,
        "sizes": list(sizes),
        "depth": depth,
        "top_k": top_k,
        "temperature": temperature,
    }
    if trajectory != "greedy":  # a key only where it differs, so directories logged before it still resume
        settings["trajectory"] = trajectory
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old["settings"] != settings:
            raise DraftwiseError(f"{out} holds rounds logged with other settings: {old['settings']}; use another --out")
    prompts = training_prompts(sharegpt, gsm)
    meta_path.write_text(json.dumps({"settings": settings, "prompts": len(prompts)}, indent=2) + "\n")
    engine = Engine.load(model, method="ar", dtype=dtype)  # the engine generation runs on: lean where it applies
    drafter = EagleDrafter(load_head(engine, draft_head), top_k=top_k, depth=depth, total_tokens=max(sizes))
    target = engine.target
    target.feature_layers = drafter.feature_layers
    law = Sampling(temperature)
    total = 0
    bar = tqdm(list(enumerate(prompts)), desc="prompts", unit="prompt")
    for prompt_id, (source, text) in bar:
        part = out / f"part-{prompt_id:05d}.parquet"
        if part.exists():
            continue
        ids = engine.encode(text)
        records = []
        draws = torch.Generator().manual_seed(prompt_id) if trajectory == "sampled" else None  # resumable: per prompt
        for i, record in enumerate(
            log_generation(target, drafter, ids, max_new_tokens, sizes, law, engine.stop_token_ids, sampled=draws)
        ):
            records.append({"prompt_id": prompt_id, "source": source, "round": i, **record})
        if records:
            write_part(part, records)
        total += len(records)
        tau = sum(r["accepted"] + 1 for r in records) / max(len(records), 1)
        bar.set_postfix(rounds=total, tau=f"{tau:.2f}")
    return total


def cmd_log_rounds(args: argparse.Namespace) -> int:
    sizes = tuple(sorted({int(s) for s in args.sizes.split(",")}))
    if not sizes or sizes[0] < 1:
        raise DraftwiseError("--sizes must be positive integers")
    if args.depth < 1 or args.top_k < 1 or args.max_new_tokens < 1:
        raise DraftwiseError("--depth, --top-k and --max-new-tokens must be >= 1")
    if args.temperature <= 0:
        raise DraftwiseError("--temperature (the sampling law whose acceptance is logged) must be > 0")
    if args.trajectory not in ("greedy", "sampled"):
        raise DraftwiseError("--trajectory must be greedy or sampled")
    if args.threads:
        torch.set_num_threads(args.threads)
    total = log_rounds(
        Path(args.out),
        args.model,
        args.dtype,
        args.draft_head,
        args.sharegpt,
        args.gsm,
        args.max_new_tokens,
        sizes,
        args.depth,
        args.top_k,
        args.temperature,
        args.trajectory,
    )
    print(f"logged {total} new rounds into {args.out}")
    return 0


def register(commands) -> None:
    parser = commands.add_parser("log-rounds", help="log full-depth eagle rounds for training tree policies")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--draft-head", default=None, help="draft head directory (default: shipped)")
    parser.add_argument("--out", default="runs/policy-rounds")
    parser.add_argument("--sharegpt", type=int, default=48, help="ShareGPT training prompts (past the head's)")
    parser.add_argument("--gsm", type=int, default=16, help="GSM-style prompts (reasoning-gym, if installed)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="verification sizes V")
    parser.add_argument("--depth", type=int, default=LOG_DEPTH, help="expansion calls per logged round")
    parser.add_argument("--top-k", type=int, default=LOG_TOP_K, help="frontier width")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling law of the logged acceptance")
    parser.add_argument(
        "--trajectory",
        default="greedy",
        help="the logged text: greedy, or sampled from the --temperature law (for policies that serve sampling)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.set_defaults(func=cmd_log_rounds)
