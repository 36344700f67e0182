"""What the decode loop needs from a target model (the `Target` protocol), what one verify forward returns, and
what a target computes in (`ComputeMode`).

Invariant between rounds: a target's KV cache holds every committed token except the newest one, which is the
root of the next draft tree. After a verify forward the cache also holds the whole tree; `commit` moves the
accepted path into place and drops the rest, so the cache equals what plain decoding would have built.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from draftwise.core.tree import DraftTree


@dataclass
class TargetOutput:
    logits: Tensor  # (N, V) float32: next-token scores after each node
    features: Tensor | None  # (N, F, H) hidden states at the requested layers, or None


@dataclass(frozen=True)
class ComputeMode:
    """What a target computes in: its activations' dtype and how its weights are stored. Tuned tree shapes and the
    shipped policies are chosen by it, because the same model costs differently in each (docs/results.md)."""

    activations: str  # a torch dtype's name ("float32", "bfloat16"), or "gguf": llama.cpp on the file's own formats
    weights: str | None = None  # None: dense; "int4": on 4-bit GGUF grids; "w4a8": 4-bit grids x 8-bit activations

    @classmethod
    def dense(cls, dtype: torch.dtype) -> ComputeMode:
        return cls(str(dtype).removeprefix("torch."))

    @classmethod
    def parse(cls, name: str) -> ComputeMode:
        """The mode a `name` (as cost models record it, "float32+w4a8") stands for."""
        activations, _, weights = name.partition("+")
        return cls(activations, weights or None)

    @property
    def name(self) -> str:
        """ "float32", "bfloat16+int4", "float32+w4a8", "gguf": what reports and cost models show."""
        return self.activations if self.weights is None else f"{self.activations}+{self.weights}"

    @property
    def dir_name(self) -> str:
        """The directory name of the policies fitted for it ("float32-w4a8")."""
        return self.name.replace("+", "-")

    def __str__(self) -> str:
        return self.name


# (nodes verified, tokens in the cache before, seconds) of one verify forward
ForwardHook = Callable[[int, int, float], None]


class Target(Protocol):
    """A target model driven one draft tree at a time: transformers (targets/hf.py), draftwise's lean llama path
    (targets/lean/) and llama.cpp (targets/llama_cpp.py) satisfy it."""

    backend: str  # who runs the model: "hf", "lean" or "llama" (`--engine`)
    config: Any  # the model's Hugging Face config
    device: torch.device
    max_length: int  # the context window, in tokens
    max_leaves: int | None  # the most leaves a tree may have (llama.cpp's sequence ids); None: no limit
    feature_layers: tuple[int, ...]  # hidden states `forward_tree` returns as features, for draft heads
    # measured seconds to verify a tree of N nodes (root included) at the current context; None where not measured
    verify_cost: Callable[[int], float] | None
    # the compiled csrc/avx512.cpp module where this target's attention runs on it (a draft head beside it uses it
    # too), else None
    native_kernels: Any | None
    on_forward: ForwardHook | None  # called after every `forward_tree` when set (`draftwise profile` times them)

    @property
    def compute(self) -> ComputeMode: ...

    @property
    def length(self) -> int:
        """Tokens in the KV cache."""
        ...

    def reset(self) -> None: ...

    def prefill(self, token_ids: Tensor) -> Tensor | None:
        """Put `token_ids` (T,) into an empty cache; returns their features (T, F, H) where features are asked."""
        ...

    def forward_tree(self, tree: DraftTree) -> TargetOutput:
        """One forward over every node of `tree`, each attending to the cache plus its own ancestors."""
        ...

    def commit(self, past_length: int, path: list[int]) -> None:
        """Keep only the accepted `path` (node indices, root first) after a verify forward at `past_length`."""
        ...

    def truncate(self, length: int) -> None:
        """Drop cached tokens past `length`."""
        ...


class TargetBase:
    """What the three backends share: `forward_tree` with its timing hook around their own `_forward_tree`."""

    on_forward: ForwardHook | None = None
    length: int

    def forward_tree(self, tree: DraftTree) -> TargetOutput:
        """One forward over every node of `tree`, each attending to the cache plus its own ancestors."""
        if self.on_forward is None:
            return self._forward_tree(tree)
        context, start = self.length, time.perf_counter()  # a timing hook: the same forward, timed
        out = self._forward_tree(tree)
        self.on_forward(tree.size, context, time.perf_counter() - start)
        return out

    def _forward_tree(self, tree: DraftTree) -> TargetOutput:
        raise NotImplementedError
