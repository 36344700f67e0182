"""EAGLE-2's dynamic draft tree, for any drafter that can score a frontier of nodes in one call.

Expansion keeps a beam ("frontier") of the top-k nodes by cumulative log-prob; each call scores all of
them, every frontier node proposes its top-k children, and the best k of those k*k become the next frontier.
At the end the whole candidate set is reranked and the best `total_tokens` nodes are verified.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from draftwise.tree import DraftTree

# step(frontier node ids (k,), frontier tokens (k,), parent id of every node so far) -> next-token log-probs (k, V)
ExpandStep = Callable[[Tensor, Tensor, Tensor], Tensor]


def grow_dynamic_tree(
    root: int, root_logprobs: Tensor, step: ExpandStep, top_k: int, depth: int, total_tokens: int
) -> DraftTree:
    """Build the candidate tree with `depth` expansion calls after the root, then keep the best
    `total_tokens` nodes (root included). `step` receives node ids of the returned tree's numbering."""
    scores, tokens = root_logprobs.float().topk(top_k)
    all_tokens = [torch.tensor([root]), tokens]
    all_parents = [torch.tensor([-1]), torch.zeros(top_k, dtype=torch.long)]
    all_scores = [torch.zeros(1), scores]
    frontier = torch.arange(1, top_k + 1)
    frontier_scores, frontier_tokens = scores, tokens
    count = 1 + top_k
    for _ in range(depth):
        logprobs = step(frontier, frontier_tokens, torch.cat(all_parents)).float()  # (k, V)
        child_lp, child_tok = logprobs.topk(top_k, dim=-1)  # (k, k)
        cand_scores = (frontier_scores[:, None] + child_lp).flatten()
        cand_parents = frontier.repeat_interleave(top_k)
        cand_tokens = child_tok.flatten()
        all_tokens.append(cand_tokens)
        all_parents.append(cand_parents)
        all_scores.append(cand_scores)
        best = cand_scores.topk(top_k).indices
        frontier = count + best
        frontier_scores, frontier_tokens = cand_scores[best], cand_tokens[best]
        count += cand_tokens.numel()
    tree = DraftTree(torch.cat(all_tokens), torch.cat(all_parents), torch.cat(all_scores))
    return tree.select_top(total_tokens)
