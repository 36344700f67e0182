"""Deciding which drafted tokens the target accepts: greedy and lossless sampling.

Both functions take the tree and the target's logits at every node (logits[i] = the target's next-token
scores after node i's path) and return the accepted node path (root first) and the bonus token the target
contributes after it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from draftwise.core.kernels import avx512_kernel
from draftwise.core.tree import DraftTree

# Below this temperature sampling is greedy decoding (as in vLLM): logits / T would overflow to inf and NaN.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class Sampling:
    """Decoding parameters. A temperature below GREEDY_TEMPERATURE (0 included) means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.temperature < GREEDY_TEMPERATURE:  # one place, so no caller can reach a NaN row
            object.__setattr__(self, "temperature", 0.0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def target_probs(logits: Tensor, sampling: Sampling) -> Tensor:
    """Softmax of the processed logits (temperature, then top-k, then top-p), as plain sampling would use."""
    scores = logits.float() / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < scores.shape[-1]:
        kth = scores.topk(sampling.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -torch.inf)
    probs = scores.softmax(-1)
    return probs if sampling.top_p >= 1.0 else nucleus(probs, sampling.top_p)


def rows_on_demand(logits: Tensor, sampling: Sampling) -> Callable[[int], Tensor]:
    """A node's target row, computed when accept_sampling's walk reaches it (a round visits τ of N nodes)."""
    return lambda node: target_probs(logits[node], sampling)


def nucleus(probs: Tensor, top_p: float, heads: tuple[int, ...] = (256, 4096)) -> Tensor:
    """`probs` renormalised over each row's nucleus (the smallest set of the most likely tokens whose probability
    reaches `top_p`), zero elsewhere: top-p sampling. Each row sorts only its most likely `heads[i]` tokens, the
    first head that reaches `top_p`, because a full sort of a large vocabulary costs many times a partial one on a
    CPU (docs/results.md). The kept tokens' probabilities are rescaled, not recomputed by a second softmax over a
    masked row, which is cheaper and differs only in the last bits."""
    flat = probs.reshape(-1, probs.shape[-1])
    kept_probs = torch.zeros_like(flat)
    vocab = flat.shape[-1]
    for row, p in zip(kept_probs, flat, strict=True):
        for head in (*(h for h in heads if h < vocab), vocab):
            top, order = p.topk(head)  # descending
            cumulative = top.cumsum(-1)
            if head == vocab or cumulative[-1] >= top_p:
                break
        kept = max(1, int((cumulative - top < top_p).sum()))  # the mass before a token has not reached p: a prefix
        row[order[:kept]] = top[:kept] / cumulative[kept - 1]
    return kept_probs.view(probs.shape)


def sample_token(weights: Tensor, generator: torch.Generator | None = None) -> int:
    """One draw from a row of non-negative weights (normalised or not) by inverse CDF in float64: on a CPU
    `torch.multinomial` over a large vocabulary costs a sizeable share of a decode step, this a small fraction of it
    (docs/results.md). A token of weight zero is never drawn."""
    cumulative = torch.cumsum(weights, -1, dtype=torch.float64)
    u = torch.rand((), generator=generator, dtype=torch.float64).item() * float(cumulative[-1])
    index = int(torch.searchsorted(cumulative, u, right=True))
    if index >= weights.numel():  # u rounded up to the total: the last token that has weight
        index = int(weights.nonzero()[-1])
    return index


def top_two(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's two largest values (N, 2) and its argmax (N,), the first index on ties: one pass in
    csrc/avx512.cpp where it runs (torch's argmax and topk are two passes, each slower than this one)."""
    kernel = avx512_kernel() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
    if kernel is not None and logits.dim() == 2 and logits.shape[1] >= 2:
        return kernel.top_two(logits)
    return logits.topk(2, dim=-1).values, logits.argmax(-1)


def accept_greedy(tree: DraftTree, logits: Tensor, best_next: Tensor | None = None) -> tuple[list[int], int]:
    """Longest root path whose every token equals the target's argmax at its parent; ties go to the lower index.
    `best_next`: the argmax of every row of `logits`, where the caller has it. One pass in Python over the
    (topologically ordered) nodes: tensor ops over the ancestor matrix cost more at tree sizes."""
    best = (logits.argmax(-1) if best_next is None else best_next).tolist()
    if tree.size == 1:
        return [0], best[0]
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    depth = [0] + [-1] * (tree.size - 1)  # -1: the target disagrees somewhere on the node's root path
    deepest = 0
    for node in range(1, tree.size):
        parent = parents[node]
        if depth[parent] >= 0 and tokens[node] == best[parent]:
            depth[node] = depth[parent] + 1
            if depth[node] > depth[deepest]:  # strictly: the first (lowest-index) deepest node wins
                deepest = node
    path, node = [], deepest
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1], best[deepest]


def accept_sampling(
    tree: DraftTree, probs: Tensor | Callable[[int], Tensor], generator: torch.Generator | None = None
) -> tuple[list[int], int]:
    """Multi-candidate recursive rejection sampling (SpecInfer; EAGLE-2 when proposals are one-hot).

    At a node with target distribution p, children are tried in rank order: child x drawn from q is accepted
    with probability min(1, p(x)/q(x)); on rejection p <- norm(max(p - q, 0)). For a deterministic child
    q is one-hot, so this is "accept with p(x), else zero x and renormalise". If every child is rejected,
    the bonus token is sampled from the residual p. The output has exactly the target's distribution.

    `probs` is p at every node (N, V), or a function giving a node's row: then only the rows on the walk are
    computed (a top-p row is costly on a CPU, and a round visits τ of a tree's N nodes).
    """
    row = probs if callable(probs) else probs.__getitem__
    children = tree.children()
    node, path = 0, [0]
    while True:
        target = row(node)
        if not children[node]:  # a leaf: the bonus comes from the target's row as it is
            return path, sample_token(target, generator)
        # the target's row as children are rejected, never renormalised: a deterministic child's rejection
        # zeroes one entry and takes its weight off `mass`, in float64 (O(1), not two passes over the vocabulary)
        residual, mass = target.clone(), float(target.sum(dtype=torch.float64))
        accepted = None
        for child in children[node]:
            token = int(tree.tokens[child])
            weight = float(residual[token])
            q = None if tree.proposals is None else tree.proposals[child].float()
            q_token = 1.0 if q is None else float(q[token])  # a deterministic child's q is one-hot
            ratio = min(1.0, weight / mass / q_token) if q_token > 0 else 0.0
            if torch.rand((), generator=generator).item() < ratio:
                accepted = child
                break
            if q is None:
                residual[token] = 0.0
                mass -= weight
            else:
                residual = (residual / mass - q).clamp_min(0.0)
                mass = float(residual.sum(dtype=torch.float64))
            if mass <= 1e-12:  # every token rejected, up to rounding (reached with that probability at most)
                residual, mass = target.clone(), float(target.sum(dtype=torch.float64))
        if accepted is None:
            return path, sample_token(residual, generator)
        node = accepted
        path.append(node)


def compare_greedy(reference: list[int], reference_margins: list[float], tokens: list[int], epsilon: float) -> str:
    """Classify a greedy output against plain decoding: "identical", "near_tie" (at the first difference
    plain decoding's top-2 logit margin was under `epsilon`, so reduced-precision rounding of a tree
    forward can flip it) or "mismatch" (a bug: the difference is not explained by numerics)."""
    if tokens == reference:
        return "identical"
    first = next(
        (i for i, (a, b) in enumerate(zip(reference, tokens, strict=False)) if a != b), min(len(reference), len(tokens))
    )
    if first < len(reference_margins) and reference_margins[first] < epsilon:
        return "near_tie"
    return "mismatch"


# Near-tie thresholds in logit units: twice how far a reduced-precision tree forward can move one logit against a
# sequential one (a flip needs both top logits to move apart), as measured in docs/results.md ("losslessness");
# fp32 forwards agree to far less. gguf: llama.cpp quantizes activations to 8 bits, and its logits depend on the
# KV cells' order (targets/llama_cpp.py), so peers built differently (llama-cpp-python's `Llama`) can part from
# `ar@llama` at such margins; draftwise's own llama methods stay exact.
NEAR_TIE_EPSILON = {"bf16": 1.0, "fp16": 1.0, "fp32": 1e-3, "gguf": 1.0}
