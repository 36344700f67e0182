"""RADAR (Ma and Li, arXiv 2512.14069): an LSTM decides, before every expansion call, whether to keep drafting.

State s_t: the frontier's top-k cumulative draft log-probs after t + 1 draft calls, sorted descending. The LSTM
reads s_0, s_1, ... of the round (its state reset every round); an MLP on [h_t ; s_t] gives logits
[stop, continue]. At inference the action is sampled, as in the paper, or thresholded at 1/2. Training:
draftwise.policies.learn.radar.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from draftwise.core.errors import DraftwiseError
from draftwise.core.files import write_atomic
from draftwise.drafters.tree_policy import TreePolicy
from draftwise.policies.scores import SCORE_FLOOR


@dataclass
class RadarConfig:
    top_k: int = 8  # state width = the frontier's width
    depth: int = 5  # most expansion calls (the fixed-depth tree it replaces)
    size: int = 16  # verified nodes, root included
    hidden: int = 128
    dropout: float = 0.1
    alpha: float = 0.02  # penalty per continue (on the β-scaled reward)
    beta: float = 0.0  # 10 * (T_d + T_p), from the cost model
    gamma: float = 0.99
    sample: bool = True  # sample the action (paper) or stop when π(stop) > 1/2
    mode: str = "greedy"  # acceptance law trained on: greedy or sampling (the logged temperature)
    query_ms: float = 0.0  # measured cost of one policy query


class RadarNet(nn.Module):
    """LSTM(k -> hidden) and an MLP on [h_t ; s_t] (the skip connection) -> [stop, continue]."""

    def __init__(self, state_dim: int, hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        self.lstm = nn.LSTM(state_dim, hidden, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(hidden + state_dim, 128), nn.ReLU(), nn.Dropout(dropout), nn.Linear(128, 2))

    def forward(self, states: Tensor) -> Tensor:
        """states (B, T, k) -> logits (B, T, 2)."""
        out, _ = self.lstm(states)
        return self.mlp(torch.cat([out, states], -1))


class RadarPolicy(TreePolicy):
    """Asks the LSTM before every expansion call; the drafter reranks whatever exists when it stops."""

    name = "radar"

    def __init__(self, net: RadarNet, config: RadarConfig, seed: int = 0):
        self.net, self.config = net.eval(), config
        self.generator = torch.Generator().manual_seed(seed)
        self.queries, self.query_s = 0, 0.0  # the policy's own overhead, for reports
        # The query runs the same LSTM cell and MLP in NumPy: a dozen eager torch ops on vectors this small cost as
        # much, between draft calls, as the call a stop saves (docs/results.md)
        lstm, first, last = net.lstm, net.mlp[0], net.mlp[3]
        weights = {
            "cell": torch.cat([lstm.weight_ih_l0, lstm.weight_hh_l0], 1),
            "cell_bias": lstm.bias_ih_l0 + lstm.bias_hh_l0,
            "hidden": first.weight,
            "hidden_bias": first.bias,
            "out": last.weight,
            "out_bias": last.bias,
        }
        self.weights = {k: v.detach().float().numpy().copy() for k, v in weights.items()}
        self.hidden_size = lstm.hidden_size
        self.begin_round(0)

    def begin_round(self, committed: int):
        self.h = self.c = np.zeros(self.hidden_size, dtype=np.float32)
        return self.keep_going

    def keep_going(self, calls: int, frontier_scores: Tensor, candidate_scores: Tensor) -> bool:
        start = time.perf_counter()
        w = self.weights
        state = np.clip(frontier_scores[: self.config.top_k].float().numpy(), SCORE_FLOOR, 0.0)
        gates = w["cell"] @ np.concatenate([state, self.h]) + w["cell_bias"]
        i, f, g, o = np.split(gates, 4)  # torch's LSTM gate order
        self.c = _sigmoid(f) * self.c + _sigmoid(i) * np.tanh(g)
        self.h = _sigmoid(o) * np.tanh(self.c)
        hidden = np.maximum(w["hidden"] @ np.concatenate([self.h, state]) + w["hidden_bias"], 0.0)
        stop_logit, go_logit = w["out"] @ hidden + w["out_bias"]
        if self.config.sample:
            p_stop = float(_sigmoid(np.float32(stop_logit - go_logit)))
            stop = float(torch.rand((), generator=self.generator)) < p_stop
        else:
            stop = stop_logit > go_logit
        self.queries += 1
        self.query_s += time.perf_counter() - start
        return not stop

    def save(self, directory: Path) -> None:
        tensors = {k: v.contiguous() for k, v in self.net.state_dict().items()}
        write_atomic(directory / "radar.safetensors", save(tensors))  # each file whole, never half-written
        write_atomic(directory / "radar.json", json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path, seed: int = 0) -> RadarPolicy:
        directory = Path(directory)
        if not (directory / "radar.safetensors").exists():
            raise DraftwiseError(
                f"no RADAR policy in {directory}; train one with `draftwise train-policy --method radar`"
            )
        config = RadarConfig(**json.loads((directory / "radar.json").read_text()))
        net = RadarNet(config.top_k, config.hidden, config.dropout)
        net.load_state_dict(load_file(str(directory / "radar.safetensors")))  # strict: no silent random policy
        return cls(net, config, seed)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
