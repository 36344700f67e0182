"""EAGLE-2's dynamic draft tree, for any drafter that can score a frontier of nodes in one call.

Expansion keeps a beam ("frontier") of the top-k nodes by cumulative log-prob; each call scores all of
them, every frontier node proposes its top-k children, and the best k of those k*k become the next frontier.
At the end the whole candidate set is reranked and the best `total_tokens` nodes are verified.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from draftwise.core.tree import DraftTree
from draftwise.core.verify import sample_token, target_probs

# step(frontier node ids (k,), frontier tokens (k,), parent id of every node so far) -> next-token log-probs (k, V)
ExpandStep = Callable[[Tensor, Tensor, Tensor], Tensor]
# keep_going(expansion calls made so far, frontier cumulative log-probs (k,) sorted descending, cumulative log-probs of
# every candidate so far in creation order (k + calls * k*k,)) -> draft another level?
KeepGoing = Callable[[int, Tensor, Tensor], bool]


def candidate_tree(
    root: int,
    root_logprobs: Tensor,
    step: ExpandStep,
    top_k: int,
    depth: int,
    vocab_map: Tensor | None = None,
    keep_going: KeepGoing | None = None,
) -> DraftTree:
    """Every candidate of up to `depth` expansion calls after the root, in creation order (parents first).
    `keep_going(calls_so_far, frontier_scores, candidate_scores)` is asked before each expansion call; False stops
    drafting (RADAR's and LTD's stop decision: RADAR reads the frontier, LTD the latest level's k*k scores).
    `vocab_map` turns log-prob columns into token ids (a reduced draft vocabulary)."""
    scores, tokens = root_logprobs.float().topk(top_k)
    if vocab_map is not None:
        tokens = vocab_map[tokens]
    all_tokens = [torch.tensor([root]), tokens]
    all_parents = [torch.tensor([-1]), torch.zeros(top_k, dtype=torch.long)]
    all_scores = [torch.zeros(1), scores]
    frontier = torch.arange(1, top_k + 1)
    frontier_scores, frontier_tokens = scores, tokens
    count = 1 + top_k
    for call in range(depth):
        if keep_going is not None and not keep_going(call, frontier_scores, torch.cat(all_scores[1:])):
            break
        logprobs = step(frontier, frontier_tokens, torch.cat(all_parents)).float()  # (k, V)
        child_lp, child_tok = logprobs.topk(top_k, dim=-1)  # (k, k)
        cand_scores = (frontier_scores[:, None] + child_lp).flatten()
        cand_parents = frontier.repeat_interleave(top_k)
        cand_tokens = child_tok.flatten() if vocab_map is None else vocab_map[child_tok.flatten()]
        all_tokens.append(cand_tokens)
        all_parents.append(cand_parents)
        all_scores.append(cand_scores)
        best = cand_scores.topk(top_k).indices
        frontier = count + best
        frontier_scores, frontier_tokens = cand_scores[best], cand_tokens[best]
        count += cand_tokens.numel()
    return DraftTree(torch.cat(all_tokens), torch.cat(all_parents), torch.cat(all_scores))


def grow_dynamic_tree(
    root: int,
    root_logprobs: Tensor,
    step: ExpandStep,
    top_k: int,
    depth: int,
    total_tokens: int,
    vocab_map: Tensor | None = None,
) -> DraftTree:
    """EAGLE-2: the candidates of `depth` expansion calls, reranked to the best `total_tokens` (root included)."""
    return candidate_tree(root, root_logprobs, step, top_k, depth, vocab_map).select_top(total_tokens)


class TreeSlots:
    """Where each expanded node's key sits in a draft cache, so a frontier can attend to the committed
    context plus its own ancestors (EAGLE-2's draft-side tree mask)."""

    def __init__(self, committed: int):
        self.committed = committed
        self.slot_of: dict[int, int] = {}

    def frontier_mask(self, frontier: Tensor, parents: Tensor, past: int) -> tuple[Tensor, int]:
        """Bool mask (k, past + k) for the frontier about to be appended at `past`, and the frontier's depth."""
        k, parent_list = frontier.numel(), parents.tolist()
        mask = torch.zeros(k, past + k, dtype=torch.bool)
        mask[:, : self.committed] = True
        depth = 1
        for row, node in enumerate(frontier.tolist()):
            mask[row, past + row] = True
            self.slot_of[node] = past + row
            ancestor, depth = parent_list[node], 1
            while ancestor > 0:
                mask[row, self.slot_of[ancestor]] = True
                ancestor, depth = parent_list[ancestor], depth + 1
        return mask, depth


def sample_chain(
    root: int, root_logits: Tensor, next_logits: Callable[[int], Tensor], length: int, sampling, generator
) -> DraftTree:
    """`length` tokens sampled one after another from the drafter's q, each q kept so verification can
    accept with min(1, p/q) and stay lossless. `next_logits(token)` feeds a sampled token to the drafter."""
    vocab = root_logits.numel()
    tokens, proposals = [root], [torch.nn.functional.one_hot(torch.tensor(root), vocab).float()]
    logits = root_logits
    for i in range(length):
        q = target_probs(logits, sampling)
        token = sample_token(q, generator)
        tokens.append(token)
        proposals.append(q)
        if i + 1 < length:
            logits = next_logits(token)
    n = len(tokens)
    return DraftTree(torch.tensor(tokens), torch.arange(-1, n - 1), torch.zeros(n), torch.stack(proposals))
