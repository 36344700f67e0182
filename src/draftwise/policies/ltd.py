"""LTD, Learning To Draft (Zhang et al., ICLR 2026, arXiv 2603.01639): a depth policy and a size policy trained
with PPO for the throughput of each draft-and-verify cycle.

- depth policy π_D: after every draft call, continue or stop (observation: the latest call's candidate scores,
  the context length / 1000 and the calls so far / 10, each scalar repeated so it weighs like the scores);
- size policy π_V: once drafting stops, how many of the reranked candidates to verify, from a discrete set
  (observation: every candidate's score, padded to the maximum depth, and the same two scalars).

Both act by argmax at inference. Training: draftwise.policies.learn.ltd.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save
from torch import Tensor, nn

from draftwise.core.errors import DraftwiseError
from draftwise.core.files import write_atomic
from draftwise.core.tree import DraftTree
from draftwise.drafters.tree_policy import TreePolicy
from draftwise.policies.scores import SCORE_FLOOR


@dataclass
class LtdConfig:
    top_k: int = 8
    max_depth: int = 8  # most expansion calls
    sizes: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 24, 32)  # π_V's actions
    default_depth: int = 5  # the fixed tree LTD starts from (eagle's default) ...
    default_size: int = 16  # ... and V while π_D trains alone
    repeat: int = 8  # copies of each scalar feature (paper: 14 and 29)
    depth_arch: list[int] = field(default_factory=lambda: [1024])  # actor; critic [1024, 256]
    size_arch: list[int] = field(default_factory=lambda: [256, 256])  # actor (the critic is [1024, 256])
    mode: str = "greedy"
    query_ms: float = 0.0  # measured cost of one depth query (a size query is reported apart)
    size_query_ms: float = 0.0

    @property
    def depth_obs_dim(self) -> int:
        return self.top_k * self.top_k + 2 * self.repeat

    @property
    def size_obs_dim(self) -> int:
        return self.top_k + self.max_depth * self.top_k * self.top_k + 2 * self.repeat


def _scalars(context: np.ndarray, calls: np.ndarray, repeat: int) -> np.ndarray:
    return np.concatenate([np.repeat(context[:, None] / 1000, repeat, 1), np.repeat(calls[:, None] / 10, repeat, 1)], 1)


def depth_obs(latest: np.ndarray, context: np.ndarray, calls: np.ndarray, config: LtdConfig) -> np.ndarray:
    """(B, depth_obs_dim) from the latest call's scores (B, k or k*k)."""
    scores = np.full((latest.shape[0], config.top_k * config.top_k), SCORE_FLOOR, dtype=np.float32)
    scores[:, : latest.shape[1]] = np.clip(latest, SCORE_FLOOR, 0.0)
    return np.concatenate([scores / 10, _scalars(context, calls, config.repeat)], 1).astype(np.float32)


def size_obs(all_scores: np.ndarray, context: np.ndarray, calls: np.ndarray, config: LtdConfig) -> np.ndarray:
    """(B, size_obs_dim) from every candidate's score (B, <= k + D*k*k), those past `calls` calls masked."""
    k, width = config.top_k, config.top_k + config.max_depth * config.top_k * config.top_k
    scores = np.full((all_scores.shape[0], width), SCORE_FLOOR, dtype=np.float32)
    scores[:, : all_scores.shape[1]] = np.clip(all_scores[:, :width], SCORE_FLOOR, 0.0)
    scores[np.arange(width)[None, :] >= (k + calls * k * k)[:, None]] = SCORE_FLOOR
    return np.concatenate([scores / 10, _scalars(context, calls, config.repeat)], 1).astype(np.float32)


def mlp(inputs: int, hidden: list[int], outputs: int) -> nn.Sequential:
    """The actor: Linear-ReLU per hidden layer, then the action logits (SB3's policy_net + action_net)."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(inputs, width), nn.ReLU()]
        inputs = width
    return nn.Sequential(*layers, nn.Linear(inputs, outputs))


def numpy_layers(net: nn.Sequential) -> list[tuple[np.ndarray, np.ndarray]]:
    """The Linear layers' (weight, bias) as float32 arrays, for `numpy_argmax`."""
    return [
        (m.weight.detach().float().numpy().copy(), m.bias.detach().float().numpy().copy())
        for m in net
        if isinstance(m, nn.Linear)
    ]


def numpy_argmax(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> int:
    """argmax of an `mlp` (ReLU between the layers) on one observation. Products by einsum, on this thread: NumPy's
    BLAS splits a 1024 x 536 product over threads of its own, which then fight torch's OpenMP team for the cores:
    right after a target forward that product took many times longer than by einsum (docs/results.md)."""
    for i, (weight, bias) in enumerate(layers):
        x = np.einsum("ij,j->i", weight, x) + bias
        if i < len(layers) - 1:
            x = np.maximum(x, 0.0)
    return int(x.argmax())


class LtdPolicy(TreePolicy):
    """π_D before each expansion call, π_V on the finished candidate tree; both act by argmax.

    Queries run the actors in NumPy on observation buffers filled in place: a query runs right after a target
    forward has flushed the caches, where each eager torch op costs tens of µs (see `measure_query_ms`)."""

    name = "ltd"

    def __init__(self, depth_actor: nn.Module, size_actor: nn.Module, config: LtdConfig):
        self.depth_actor, self.size_actor, self.config = depth_actor.eval(), size_actor.eval(), config
        self.depth_layers, self.size_layers = numpy_layers(self.depth_actor), numpy_layers(self.size_actor)
        self.depth_buffer = np.zeros(config.depth_obs_dim, dtype=np.float32)
        self.size_buffer = np.zeros(config.size_obs_dim, dtype=np.float32)
        self.context = 0
        self.queries, self.query_s = 0, 0.0

    def begin_round(self, committed: int):
        self.context = committed
        return self.keep_going

    def _observe(self, buffer: np.ndarray, scores: Tensor, calls: int) -> np.ndarray:
        """`buffer` = [clip(scores) / 10, padded with the floor ; context / 1000 ; calls / 10]: what depth_obs and
        size_obs build for one round."""
        repeat = self.config.repeat
        width = buffer.size - 2 * repeat
        values = np.clip(scores[:width].float().numpy(), SCORE_FLOOR, 0.0) / 10
        buffer[: values.size] = values
        buffer[values.size : width] = SCORE_FLOOR / 10
        buffer[width : width + repeat] = self.context / 1000
        buffer[width + repeat :] = calls / 10
        return buffer

    def keep_going(self, calls: int, frontier_scores: Tensor, candidate_scores: Tensor) -> bool:
        start = time.perf_counter()
        k = self.config.top_k
        latest = candidate_scores[-k:] if calls == 0 else candidate_scores[-k * k :]
        go = numpy_argmax(self.depth_layers, self._observe(self.depth_buffer, latest, calls)) == 1
        self.queries += 1
        self.query_s += time.perf_counter() - start
        return go

    def verify_size(self, candidates: DraftTree, budget: int) -> int:
        start = time.perf_counter()
        k = self.config.top_k
        calls = max(0, (candidates.size - 1 - k) // (k * k))
        scores = candidates.scores[1 : 1 + k + calls * k * k]  # size_obs masks candidates past `calls` calls
        size = self.config.sizes[numpy_argmax(self.size_layers, self._observe(self.size_buffer, scores, calls))]
        self.queries += 1
        self.query_s += time.perf_counter() - start
        return min(size, budget)

    def save(self, directory: Path) -> None:
        tensors = {f"depth.{k}": v for k, v in self.depth_actor.state_dict().items()}
        tensors.update({f"size.{k}": v for k, v in self.size_actor.state_dict().items()})
        write_atomic(directory / "ltd.safetensors", save({k: v.contiguous() for k, v in tensors.items()}))
        write_atomic(directory / "ltd.json", json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> LtdPolicy:
        directory = Path(directory)
        if not (directory / "ltd.safetensors").exists():
            raise DraftwiseError(f"no LTD policy in {directory}; train one with `draftwise train-policy --method ltd`")
        raw = json.loads((directory / "ltd.json").read_text())
        config = LtdConfig(**{**raw, "sizes": tuple(raw["sizes"])})
        depth_actor, size_actor = actors(config)
        state = load_file(str(directory / "ltd.safetensors"))
        depth_actor.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("depth.")})
        size_actor.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("size.")})
        return cls(depth_actor, size_actor, config)


def actors(config: LtdConfig) -> tuple[nn.Sequential, nn.Sequential]:
    return (
        mlp(config.depth_obs_dim, config.depth_arch, 2),
        mlp(config.size_obs_dim, config.size_arch, len(config.sizes)),
    )
