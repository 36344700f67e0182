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
its path; RADAR, arXiv 2512.14069, §4.3). The trajectory continues greedily on the union's verdict, so the
logged text is plain greedy decoding's, or (`--trajectory sampled`) by rejection sampling under the logged law,
so the logged contexts are the text a sampling policy will see (at T = 1 the target is less sure of its own
sampled text than of its greedy text: docs/results.md). `draftwise log-rounds` (draftwise.training.log_rounds)
runs it over the training prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from draftwise.core.drafter import DraftContext, RoundResult
from draftwise.core.target import Target
from draftwise.core.tree import DraftTree
from draftwise.core.verify import Sampling, accept_greedy, accept_sampling, rows_on_demand, target_probs
from draftwise.drafters.eagle import EagleDrafter
from draftwise.drafters.tree_policy import TreePolicy

DEFAULT_SIZES = (1, 2, 4, 6, 8, 10, 12, 16, 24, 32)  # verification sizes V (root included) the logs can answer for
LOG_DEPTH, LOG_TOP_K = 8, 8
T1 = Sampling(1.0)  # the law whose acceptance probabilities are logged by default (RADAR's)


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
    target: Target,
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


def write_part(path: Path, records: list[dict]) -> None:
    import pyarrow as pa  # the optional [train] extra
    import pyarrow.parquet as pq

    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pylist(records), tmp, compression="zstd")
    tmp.replace(path)
