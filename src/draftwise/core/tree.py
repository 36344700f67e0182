"""The draft tree: candidate continuations of the context, verified by the target in one forward.

Node 0 is the root: the last committed token, which is not yet in the target's KV cache. Nodes are stored
in topological order (every parent index is smaller than its child's), so a prefix of the node list is always
a valid tree and "sort kept indices" keeps parents before children.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class DraftTree:
    """tokens, parents and cumulative draft log-scores of every node; node 0 is the root.

    `proposals`, when given, holds for every node the distribution its token was *sampled* from (rows of a
    deterministic node are one-hot); sampling verification needs it to stay lossless. None means every
    node is a deterministic proposal.
    """

    tokens: Tensor  # (N,) long
    parents: Tensor  # (N,) long, parents[0] == -1, parents[i] < i
    scores: Tensor  # (N,) float, root 0.0; higher = more likely to be accepted
    proposals: Tensor | None = None  # (N, V) float or None
    _ancestors: Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def root_only(cls, token: int) -> DraftTree:
        return cls(torch.tensor([token]), torch.tensor([-1]), torch.zeros(1))

    @classmethod
    def from_sequences(
        cls, root: int, sequences: Sequence[Sequence[int]], weights: Sequence[float] | None = None
    ) -> DraftTree:
        """A trie of token sequences that all continue `root`; a node's score is the log of the share of
        (weighted) sequences that pass through it, so frequent prefixes rank first."""
        weights = list(weights) if weights is not None else [1.0] * len(sequences)
        total = sum(weights) or 1.0
        tokens, parents, mass = [root], [-1], [total]
        children: dict[tuple[int, int], int] = {}
        for seq, w in zip(sequences, weights, strict=True):
            node = 0
            for tok in seq:
                key = (node, int(tok))
                if key not in children:
                    children[key] = len(tokens)
                    tokens.append(int(tok))
                    parents.append(node)
                    mass.append(0.0)
                node = children[key]
                mass[node] += w
        scores = torch.tensor(mass, dtype=torch.float32).div(total).clamp_min(1e-9).log()
        return cls(torch.tensor(tokens), torch.tensor(parents), scores)

    @property
    def size(self) -> int:
        return int(self.tokens.numel())

    @property
    def ancestors(self) -> Tensor:
        """(N, N) bool: row i marks the ancestors of node i, itself included (the tree attention mask)."""
        if self._ancestors is None and self.size <= 62:
            # as bitsets in Python ints (a node's = its parent's plus itself): far cheaper than the level-by-level
            # loop below, which on a deep chain costs a sizeable share of prompt lookup's round
            bits = [1]
            for i, parent in enumerate(self.parents.tolist()[1:], start=1):
                bits.append(bits[parent] | 1 << i)
            self._ancestors = (torch.tensor(bits)[:, None] >> torch.arange(self.size)) & 1 == 1
        if self._ancestors is None:
            n = self.size
            mask = torch.eye(n, dtype=torch.bool)
            index = torch.arange(n)
            up = self.parents.clamp_min(0)  # the root points at itself
            cur = up.clone()
            while True:  # one step per tree level, vectorised over all nodes
                mask[index, cur] = True
                if bool((cur == 0).all()):
                    break
                cur = up[cur]
            self._ancestors = mask
        return self._ancestors

    @property
    def depths(self) -> Tensor:
        """(N,) long: root 0, its children 1, ..."""
        return self.ancestors.sum(1) - 1

    def position_ids(self, past_length: int) -> Tensor:
        """(1, N) positions: a node sits where it would in the sequence if its path were accepted."""
        return (past_length + self.depths).unsqueeze(0)

    def attention_mask(self, past_length: int) -> Tensor:
        """(1, 1, N, past + N) bool, True = attend: the whole committed context plus the node's ancestors."""
        n = self.size
        past = torch.ones(n, past_length, dtype=torch.bool)
        return torch.cat([past, self.ancestors], dim=1)[None, None]

    def leaves(self) -> Tensor:
        is_parent = torch.zeros(self.size, dtype=torch.bool)
        is_parent[self.parents[1:]] = True
        return (~is_parent).nonzero().flatten()

    def paths(self) -> list[list[int]]:
        """Root-to-leaf node-index paths, leaves in index order."""
        return [self.ancestors[leaf].nonzero().flatten().tolist() for leaf in self.leaves()]

    def children(self) -> list[list[int]]:
        """Child indices of every node in index (= draft rank) order."""
        kids: list[list[int]] = [[] for _ in range(self.size)]
        for child, parent in enumerate(self.parents.tolist()[1:], start=1):
            kids[parent].append(child)
        return kids

    def subtree(self, keep: Tensor | Sequence[int]) -> DraftTree:
        """The tree restricted to `keep` (node indices, containing 0, closed under ancestors). The parents are
        remapped in Python: a dozen small tensor ops cost more, and this runs several times a round."""
        kept = sorted(keep.tolist() if isinstance(keep, Tensor) else keep)
        new_index = {old: new for new, old in enumerate(kept)}
        parents = self.parents.tolist()
        try:
            new_parents = [new_index[parents[i]] if parents[i] >= 0 else -1 for i in kept]
        except KeyError:
            raise ValueError("subtree: the kept nodes are not closed under ancestors") from None
        if kept[0] != 0:
            raise ValueError("subtree: the kept nodes must include the root")
        index = torch.tensor(kept)
        proposals = self.proposals[index] if self.proposals is not None else None
        return DraftTree(self.tokens[index], torch.tensor(new_parents), self.scores[index], proposals)

    def select_top(self, budget: int) -> DraftTree:
        """The best `budget` nodes (root included) by score, always ancestor-closed.

        A node is ranked by the lowest score on its root path, then by depth, then index. Its key can never
        beat its parent's, so every prefix of the ranking is a valid tree even when scores are not monotone
        (as with retrieval nodes fused into a draft tree). Plain Python: trees are small, and the tensor version
        of this spent a round's share in small ops."""
        if budget >= self.size:
            return self
        parents, scores = self.parents.tolist(), self.scores.tolist()
        path_min, depth = [float("inf")], [0]
        for i in range(1, self.size):  # parents come before children
            path_min.append(min(path_min[parents[i]], scores[i]))
            depth.append(depth[parents[i]] + 1)
        ranked = sorted(range(self.size), key=lambda i: (-path_min[i], depth[i], i))
        return self.subtree(ranked[: max(budget, 1)])

    def _child_of(self) -> dict[tuple[int, int], int]:
        """(parent, token) -> node, every node but the root."""
        pairs = zip(self.parents.tolist(), self.tokens.tolist(), strict=True)
        return {pair: i for i, pair in enumerate(pairs) if i}

    def prefix_depth(self, tokens: Sequence[int]) -> int:
        """How many of `tokens` (continuing the root) this tree holds as one path from the root."""
        child_of = self._child_of()
        node = 0
        for depth, token in enumerate(tokens):
            node = child_of.get((node, token), -1)
            if node < 0:
                return depth
        return len(tokens)

    def merge(self, other: DraftTree) -> DraftTree:
        """Fuse `other` into this tree by longest prefix matching: shared prefixes map onto existing nodes
        (keeping the higher score), the rest is appended as new branches. Both roots must be the same token."""
        if self.proposals is not None or other.proposals is not None:
            raise ValueError("merge is defined for deterministic trees only")
        if int(self.tokens[0]) != int(other.tokens[0]):
            raise ValueError("merge: the trees continue different roots")
        tokens, parents, scores = self.tokens.tolist(), self.parents.tolist(), self.scores.tolist()
        child_of = self._child_of()
        mapped = [0] * other.size
        for j, (tok, par, score) in enumerate(
            zip(other.tokens.tolist(), other.parents.tolist(), other.scores.tolist(), strict=True)
        ):
            if j == 0:
                continue
            key = (mapped[par], tok)
            if key in child_of:
                mapped[j] = child_of[key]
                scores[mapped[j]] = max(scores[mapped[j]], score)
            else:
                mapped[j] = child_of[key] = len(tokens)
                tokens.append(tok)
                parents.append(key[0])
                scores.append(score)
        return DraftTree(torch.tensor(tokens), torch.tensor(parents), torch.tensor(scores, dtype=torch.float32))
