"""Training RADAR (draftwise.policies.radar) offline, as the paper does (arXiv 2512.14069, §5): Monte-Carlo policy
gradient on logged rounds.

Actions are sampled at every step, L is the first stop, A is drawn from the logged acceptance law of the tree
L expansions would have built (a point mass in greedy mode), and with reward r_L = β·A / t(L) and -α per
continue the loss is -mean_t log π(a_t | s_≤t)·G_t (reward-to-go G_t, γ = 0.99, no baseline). t(L) comes from
this machine's cost model: overhead, L + 1 head calls, the verify forward of this round's tree at its context
length, and min(L + 1, D) policy queries; β = 10·(T_d + T_p).

Ours versus the paper: the state is k = 8 wide (eagle's top-k here, 10 there); stopping before any expansion
verifies the root's top-k (k + 1 nodes) rather than a 59-node star; the kept epoch is the one with the best
validation tokens/s (the paper's is the lowest, itself stochastic, test loss); greedy rounds give a point mass
for A; and the split is by prompt, not by round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from draftwise.core.errors import DraftwiseError
from draftwise.policies.cost import CostModel
from draftwise.policies.learn.measure import evict_caches
from draftwise.policies.learn.offline import RoundSet, simulate
from draftwise.policies.radar import RadarConfig, RadarNet, RadarPolicy


def measure_query_ms(net: RadarNet, top_k: int, depth: int, repeats: int = 50) -> float:
    """Mean ms of one inference query (one LSTM step and the MLP), each timed with the caches flushed first, as
    the target forward and the head call before it leave them in a round (several times a warm query's time)."""
    policy = RadarPolicy(net, RadarConfig(top_k=top_k, depth=depth))
    scores = -torch.rand(top_k).sort(descending=True).values * 5
    elapsed = 0.0
    for i in range(repeats):
        keep_going = policy.begin_round(0) if i % depth == 0 else policy.keep_going
        evict_caches()
        start = time.perf_counter()
        keep_going(i % depth, scores, scores)
        elapsed += time.perf_counter() - start
    return 1000 * elapsed / repeats


@dataclass
class RadarData:
    """Per-round training tensors: states (R, D, k), round seconds t(L) (R, D+1), and the acceptance law
    (R, D+1, D+2) of the tree each stopping point builds."""

    states: Tensor
    seconds: Tensor
    law: Tensor

    @classmethod
    def build(cls, rounds: RoundSet, cost: CostModel, config: RadarConfig) -> RadarData:
        d, n = config.depth, len(rounds)
        if d > rounds.depth or config.top_k != rounds.top_k:
            raise DraftwiseError(f"the logs have depth {rounds.depth} and top-k {rounds.top_k}; RADAR needs {d}, k")
        v = rounds.size_index(config.size)
        states = np.stack([rounds.frontier(c) for c in range(d)], 1)
        seconds = np.stack(
            [rounds.seconds(cost, np.full(n, c), np.full(n, v)) for c in range(d + 1)], 1
        ) + config.query_ms / 1000 * np.minimum(np.arange(d + 1) + 1, d)
        if config.mode == "greedy":
            law = np.zeros((n, d + 1, rounds.depth + 2), dtype=np.float32)
            np.put_along_axis(law, rounds.accepted[:, : d + 1, v, None].astype(np.int64), 1.0, axis=2)
        else:
            reach = rounds.reach[:, : d + 1, v].astype(np.float64)
            law = np.clip(reach - np.concatenate([reach[..., 1:], np.zeros_like(reach[..., :1])], -1), 0, None)
            law /= law.sum(-1, keepdims=True)
        return cls(torch.tensor(states).float(), torch.tensor(seconds).float(), torch.tensor(law).float())


def returns(calls: Tensor, accepted: Tensor, seconds: Tensor, config: RadarConfig) -> Tensor:
    """G_t for decisions t = 0..D-1 (B, D): -α per continue until the stop at L, then γ^(L-t)·β·A/t(L); 0 after."""
    d = config.depth
    t = torch.arange(d)[None, :]
    steps = (calls[:, None] - t).clamp_min(0).float()  # continues from t to the stop
    gamma = config.gamma
    penalty = -config.alpha * (1 - gamma**steps) / (1 - gamma) if gamma < 1 else -config.alpha * steps
    terminal = gamma**steps * (config.beta * accepted / seconds)[:, None]
    return torch.where(t <= calls[:, None], penalty + terminal, torch.zeros(()))


def rollout(net: RadarNet, states: Tensor, sample: bool, generator: torch.Generator | None = None):
    """(log π of the taken actions (B, D), stop index L (B,)) for one pass over the states."""
    logits = net(states)
    log_probs = logits.log_softmax(-1)
    if sample:
        actions = torch.multinomial(log_probs.exp().view(-1, 2), 1, generator=generator).view(states.shape[:2])
    else:
        actions = (log_probs[..., 1] >= log_probs[..., 0]).long()
    stopped = actions == 0
    d = states.shape[1]
    calls = torch.where(stopped.any(1), stopped.float().argmax(1), torch.full((states.shape[0],), d))
    return log_probs.gather(-1, actions[..., None])[..., 0], calls


def train_radar(
    train: RoundSet,
    validation: RoundSet,
    cost: CostModel,
    config: RadarConfig,
    epochs: int = 100,
    batch_size: int = 64,
    lr: float = 1e-4,
    weight_decay: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
) -> tuple[RadarNet, list[dict]]:
    """REINFORCE on the logged rounds (the paper's §5.1); keeps the epoch with the best validation tokens/s."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = RadarData.build(train, cost, config)
    net = RadarNet(config.top_k, config.hidden, config.dropout)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=1e-6)
    history, best, best_state = [], -1.0, None
    bar = tqdm(range(epochs), desc=f"radar α={config.alpha}", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        net.train()
        order = torch.randperm(data.states.shape[0], generator=generator)
        total = 0.0
        for start in range(0, order.numel(), batch_size):
            idx = order[start : start + batch_size]
            log_pi, calls = rollout(net, data.states[idx], True, generator)
            law = data.law[idx, calls]  # (B, D+2)
            accepted = torch.multinomial(law, 1, generator=generator)[:, 0].float()
            seconds = data.seconds[idx, calls]
            loss = -(log_pi * returns(calls, accepted, seconds, config)).mean()
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            total += loss.item() * idx.numel()
        schedule.step()
        report = evaluate(net, validation, cost, config, seed=seed)
        report.update(epoch=epoch, loss=total / order.numel())
        history.append(report)
        if report["speed_ratio"] > best:
            best, best_state = report["speed_ratio"], {k: v.clone() for k, v in net.state_dict().items()}
        bar.set_postfix(ratio=f"{report['speed_ratio']:.3f}", calls=f"{report['draft_calls']:.2f}")
    net.load_state_dict(best_state)
    return net.eval(), history


@torch.no_grad()
def radar_calls(net: RadarNet, rounds: RoundSet, config: RadarConfig, sample: bool, seed: int = 0) -> np.ndarray:
    """Expansion calls the policy makes on each logged round."""
    states = torch.tensor(np.stack([rounds.frontier(c) for c in range(config.depth)], 1)).float()
    net.eval()
    _, calls = rollout(net, states, sample, torch.Generator().manual_seed(seed))
    return calls.numpy()


def evaluate(net: RadarNet, rounds: RoundSet, cost: CostModel, config: RadarConfig, seed: int = 0) -> dict:
    """Offline validation (the paper's §5.3): the policy's mean draft calls, τ and tokens/s against the fixed depth,
    averaged over 10 sampled rollouts (or one thresholded pass); tokens count the bonus token."""
    v = rounds.size_index(config.size)
    mode = config.mode
    fixed = simulate(rounds, cost, np.full(len(rounds), config.depth), np.full(len(rounds), v), mode)
    reports = []
    for r in range(10 if config.sample else 1):
        calls = radar_calls(net, rounds, config, config.sample, seed + r)
        queries = np.minimum(calls + 1, config.depth) * config.query_ms / 1000
        reports.append(simulate(rounds, cost, calls, np.full(len(rounds), v), mode, queries).summary(rounds.sizes))
    out = {key: float(np.mean([r[key] for r in reports])) for key in reports[0]}
    base = fixed.summary(rounds.sizes)
    out.update(
        fixed_draft_calls=base["draft_calls"],
        fixed_tau=base["tau"],
        fixed_tokens_per_s=base["tokens_per_s"],
        speed_ratio=out["tokens_per_s"] / base["tokens_per_s"],
        calls_reduction=1 - out["draft_calls"] / base["draft_calls"],
        tau_ratio=out["tau"] / base["tau"],
    )
    return out
