"""Training LTD (draftwise.policies.ltd; Zhang et al., ICLR 2026, arXiv 2603.01639) offline with PPO.

Reward (paper eq. 4): tokens committed (accepted + bonus) / seconds of the cycle, here from this machine's cost
model on the logged rounds (offline.py), divided by the fixed tree's mean throughput so it is O(1). Each policy
is a Stable-Baselines3 PPO agent on a Gymnasium environment replaying those rounds; the two are trained apart
first and then co-trained, one frozen (acting by argmax) while the other learns: size -> depth -> size. Every
stage keeps its checkpoint with the best validation tokens/s.

Choices where the paper and its published code disagree, and ours:
 1. size actions: neither the paper's 20..240 nor the code's 10..240 — on a CPU verification cost climbs
    steeply past a few dozen tokens, so V comes from the logged sizes (default 1, 2, 4, 8, 12, 16, 24, 32),
    clipped to the candidates that exist, as the code clips;
 2. PPO hyperparameters: the paper's (n_steps 2048, batch 256, 20 epochs, entropy 0.01, lr 1e-3 with 1% warm-up
    then linear decay);
 3. γ: the paper's (depth 0.999, size 0.9; a size episode is one step, so it does not matter there);
 4. activation: the paper's ReLU; actors: the paper's [1024] for π_D, but [256, 256] for π_V, not [1024, 256]:
    its 536 inputs make that first layer cost twice as much per query inside a round (policy queries run cold,
    right after a target forward; `draftwise profile` times them there);
 5. initial size training: depth uniform over [0, max depth] (paper), not fixed at the maximum (code);
 6. depth decisions after every draft call (paper), in training and inference alike;
 7. the context-length feature is the real length / 1000 at training and inference;
 8. co-training order size -> depth -> size (paper §6.1 and Tables 7/8), best checkpoint per stage;
 9. candidate pool: the code's count, k + N·k² candidates plus the root after N expansion calls;
10. total steps: far fewer than the paper's 1M / 100k (the whole training must finish in minutes on 2 CPU
    cores); the offline environment makes each step cheap, and validation picks the checkpoint;
11. timing: no wall clock in the loop at all — seconds come from the profiled cost model; the policies' own
    time is measured apart (reported per query).
Two more of ours: scores are clipped to [-30, 0], padded with -30 (zero would read as a certain candidate), and
divided by 10; the first expansion is not forced (a round may stop after the catch-up call alone).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from draftwise.core.errors import DraftwiseError
from draftwise.core.tree import DraftTree
from draftwise.policies.cost import CostModel
from draftwise.policies.learn.measure import evict_caches
from draftwise.policies.learn.offline import RoundSet, fixed, simulate
from draftwise.policies.ltd import LtdConfig, LtdPolicy, depth_obs, mlp, size_obs

Actor = Callable[[np.ndarray], np.ndarray]  # observations (B, dim) -> argmax actions (B,)


def argmax_actor(net: nn.Module) -> Actor:
    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        return net(torch.from_numpy(obs)).argmax(-1).numpy()

    return act


def depth_calls(rounds: RoundSet, depth_actor: Actor | None, config: LtdConfig) -> np.ndarray:
    """Expansion calls π_D makes on each round (the default depth without one)."""
    n = len(rounds)
    if depth_actor is None:
        return np.full(n, config.default_depth)
    calls = np.zeros(n, dtype=np.int64)
    active = np.ones(n, dtype=bool)
    for c in range(config.max_depth):
        idx = np.nonzero(active)[0]
        if idx.size == 0:
            break
        obs = depth_obs(rounds.level(c)[idx], rounds.context[idx], np.full(idx.size, c), config)
        go = depth_actor(obs) == 1
        active[idx[~go]] = False
        calls[idx[go]] += 1
    return calls


def size_choice(rounds: RoundSet, calls: np.ndarray, size_actor: Actor | None, config: LtdConfig) -> np.ndarray:
    """Index into rounds.sizes of the V π_V picks (the default size without one)."""
    if size_actor is None:
        return np.full(len(rounds), rounds.size_index(config.default_size))
    action = size_actor(size_obs(rounds.level_scores, rounds.context, calls, config))
    return np.array([rounds.size_index(config.sizes[a]) for a in action])


def evaluate(
    rounds: RoundSet, cost: CostModel, config: LtdConfig, depth_actor: Actor | None, size_actor: Actor | None
) -> dict:
    """Offline validation: the two policies (argmax) against the default fixed tree on the same rounds."""
    calls = depth_calls(rounds, depth_actor, config)
    size_index = size_choice(rounds, calls, size_actor, config)
    queries = (np.minimum(calls + 1, config.max_depth) * config.query_ms + config.size_query_ms) / 1000
    out = simulate(rounds, cost, calls, size_index, config.mode, queries).summary(rounds.sizes)
    base = simulate(rounds, cost, *fixed(rounds, config.default_depth, config.default_size), config.mode)
    base_summary = base.summary(rounds.sizes)
    out.update(
        fixed_draft_calls=base_summary["draft_calls"],
        fixed_tokens_per_s=base_summary["tokens_per_s"],
        fixed_tau=base_summary["tau"],
        speed_ratio=out["tokens_per_s"] / base_summary["tokens_per_s"],
    )
    return out


# --- Gymnasium environments over the logged rounds --------------------------------------------------------------


def _envs():
    import gymnasium as gym  # the optional [train] extra

    class DepthEnv(gym.Env):
        """One episode = one round: continue (1) or stop (0) after each draft call; reward at the stop."""

        def __init__(self, rounds: RoundSet, cost: CostModel, config: LtdConfig, size_actor: Actor | None, norm: float):
            self.rounds, self.cost, self.config, self.size_actor, self.norm = rounds, cost, config, size_actor, norm
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, (config.depth_obs_dim,), np.float32)
            self.action_space = gym.spaces.Discrete(2)
            self.round, self.calls = 0, 0

        def _obs(self) -> np.ndarray:
            r = slice(self.round, self.round + 1)
            rounds = self.rounds
            return depth_obs(rounds.level(self.calls)[r], rounds.context[r], np.array([self.calls]), self.config)[0]

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.round, self.calls = int(self.np_random.integers(len(self.rounds))), 0
            return self._obs(), {}

        def step(self, action):
            if int(action) == 1 and self.calls < self.config.max_depth:
                self.calls += 1
                if self.calls < self.config.max_depth:
                    return self._obs(), 0.0, False, False, {}
            one = self.rounds.subset(np.array([self.round]))
            calls = np.array([self.calls])
            size_index = size_choice(one, calls, self.size_actor, self.config)
            sim = simulate(one, self.cost, calls, size_index, self.config.mode)
            return self._obs(), float(sim.tokens[0] / sim.seconds[0] / self.norm), True, False, {}

    class SizeEnv(gym.Env):
        """One episode = one round: drafting stops (π_D frozen, or a uniform depth), then one choice of V."""

        def __init__(
            self, rounds: RoundSet, cost: CostModel, config: LtdConfig, depth_actor: Actor | None, norm: float
        ):
            self.rounds, self.cost, self.config, self.norm = rounds, cost, config, norm
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, (config.size_obs_dim,), np.float32)
            self.action_space = gym.spaces.Discrete(len(config.sizes))
            self.calls_by_round = depth_calls(rounds, depth_actor, config) if depth_actor is not None else None
            self.round, self.calls = 0, 0

        def _obs(self) -> np.ndarray:
            r = slice(self.round, self.round + 1)
            rounds = self.rounds
            return size_obs(rounds.level_scores[r], rounds.context[r], np.array([self.calls]), self.config)[0]

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.round = int(self.np_random.integers(len(self.rounds)))
            if self.calls_by_round is None:
                self.calls = int(self.np_random.integers(self.config.max_depth + 1))
            else:
                self.calls = int(self.calls_by_round[self.round])
            return self._obs(), {}

        def step(self, action):
            one = self.rounds.subset(np.array([self.round]))
            size_index = np.array([one.size_index(self.config.sizes[int(action)])])
            sim = simulate(one, self.cost, np.array([self.calls]), size_index, self.config.mode)
            return self._obs(), float(sim.tokens[0] / sim.seconds[0] / self.norm), True, False, {}

    return DepthEnv, SizeEnv


def warmup_linear(lr: float, warmup: float = 0.01) -> Callable[[float], float]:
    """SB3 schedule of progress_remaining (1 -> 0): linear warm-up over the first 1% of steps, then linear decay."""

    def schedule(progress_remaining: float) -> float:
        done = 1.0 - progress_remaining
        return lr * done / warmup if done < warmup else lr * progress_remaining / (1 - warmup)

    return schedule


@dataclass
class PpoSettings:
    n_steps: int = 2048
    batch_size: int = 256
    n_epochs: int = 20
    ent_coef: float = 0.01
    learning_rate: float = 1e-3
    depth_gamma: float = 0.999
    size_gamma: float = 0.9


def train_stage(
    which: str,
    train: RoundSet,
    validation: RoundSet,
    cost: CostModel,
    config: LtdConfig,
    partner: nn.Module | None,
    steps: int,
    ppo: PpoSettings,
    norm: float,
    seed: int,
    progress: bool,
) -> tuple[nn.Sequential, list[dict]]:
    """PPO for one policy ("depth" or "size") with its partner frozen (None: the stage-1 default); returns the
    actor with the best validation tokens/s among the checkpoints after each rollout."""
    from stable_baselines3 import PPO  # the optional [train] extra
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.logger import Logger

    DepthEnv, SizeEnv = _envs()
    partner_act = argmax_actor(partner) if partner is not None else None
    if which == "depth":
        env = DepthEnv(train, cost, config, partner_act, norm)
        arch, gamma = dict(pi=config.depth_arch, vf=[1024, 256]), ppo.depth_gamma
    else:
        env = SizeEnv(train, cost, config, partner_act, norm)
        arch, gamma = dict(pi=config.size_arch, vf=[1024, 256]), ppo.size_gamma
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=min(ppo.n_steps, steps),
        batch_size=ppo.batch_size,
        n_epochs=ppo.n_epochs,
        ent_coef=ppo.ent_coef,
        learning_rate=warmup_linear(ppo.learning_rate),
        gamma=gamma,
        policy_kwargs=dict(net_arch=arch, activation_fn=nn.ReLU),
        device="cpu",
        seed=seed,
        verbose=0,
    )
    model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default makes an empty temp dir per run

    def extract() -> nn.Sequential:
        policy = model.policy
        actor = nn.Sequential(*[m for m in policy.mlp_extractor.policy_net], policy.action_net)
        outputs = 2 if which == "depth" else len(config.sizes)
        hidden = config.depth_arch if which == "depth" else config.size_arch
        copy = mlp(config.depth_obs_dim if which == "depth" else config.size_obs_dim, hidden, outputs)
        copy.load_state_dict({k: v.detach().clone() for k, v in actor.state_dict().items()})
        return copy.eval()

    def validate(actor: nn.Sequential) -> dict:
        own = argmax_actor(actor)
        if which == "depth":
            return evaluate(validation, cost, config, own, partner_act)
        return evaluate(validation, cost, config, partner_act, own)

    history: list[dict] = []
    best: list = [-1.0, None]
    bar = tqdm(total=steps, desc=f"ltd {which}", unit="step", disable=not progress, leave=False)

    class Checkpoint(BaseCallback):
        def _on_step(self) -> bool:
            bar.update(1)
            return True

        def _on_rollout_end(self) -> None:
            actor = extract()
            report = validate(actor)
            report["steps"] = self.num_timesteps
            history.append(report)
            if report["tokens_per_s"] > best[0]:
                best[0], best[1] = report["tokens_per_s"], actor
            bar.set_postfix(ratio=f"{report['speed_ratio']:.3f}", calls=f"{report['draft_calls']:.2f}")

    model.learn(total_timesteps=steps, callback=Checkpoint())
    bar.close()
    return best[1], history


def train_ltd(
    train: RoundSet,
    validation: RoundSet,
    cost: CostModel,
    config: LtdConfig,
    steps: dict[str, int] | None = None,
    ppo: PpoSettings | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[LtdPolicy, list[dict]]:
    """Stage 1: π_V with uniform depth and π_D with the default V, apart. Stage 2: size -> depth -> size, the
    partner frozen. Each stage keeps its best validation checkpoint, and a stage-2 policy replaces its
    predecessor only if the pair gets faster on validation (the policies overfit the training rounds)."""
    steps = {**DEFAULT_STEPS, **(steps or {})}
    ppo = ppo or PpoSettings()
    if config.top_k != train.top_k or config.max_depth > train.depth or not set(config.sizes) <= set(train.sizes):
        raise DraftwiseError(f"the logs (top-k {train.top_k}, depth {train.depth}, sizes {train.sizes}) do not fit")
    base = simulate(train, cost, *fixed(train, config.default_depth, config.default_size), config.mode)
    norm = base.summary(train.sizes)["tokens_per_s"]

    def stage(which: str, partner: nn.Module | None, n_steps: int, stage_seed: int):
        return train_stage(which, train, validation, cost, config, partner, n_steps, ppo, norm, stage_seed, progress)

    def joint(depth_actor: nn.Module | None, size_actor: nn.Module | None) -> dict:
        acts = [argmax_actor(a) if a is not None else None for a in (depth_actor, size_actor)]
        return evaluate(validation, cost, config, *acts)

    log: list[dict] = []
    size_actor, curve = stage("size", None, steps["size0"], seed)
    log.append({"stage": "size alone (uniform depth)", **joint(None, size_actor), "curve": curve})
    depth_actor, curve = stage("depth", None, steps["depth0"], seed + 1)
    log.append({"stage": "depth alone (default V)", **joint(depth_actor, None), "curve": curve})
    current = joint(depth_actor, size_actor)
    log.append({"stage": "iter0: both", **current})
    for i, which in enumerate(("size", "depth", "size"), start=1):
        n_steps = steps[f"{which}{i}"]
        if n_steps <= 0:
            continue
        actor, curve = stage(which, depth_actor if which == "size" else size_actor, n_steps, seed + 1 + i)
        report = joint(actor, size_actor) if which == "depth" else joint(depth_actor, actor)
        kept = report["tokens_per_s"] > current["tokens_per_s"]
        if kept:
            current = report
            depth_actor, size_actor = (actor, size_actor) if which == "depth" else (depth_actor, actor)
        log.append({"stage": f"iter{i}: {which}", "kept": kept, **report, "curve": curve})
    return LtdPolicy(depth_actor, size_actor, config), log


# PPO steps per stage: size alone, depth alone, then size -> depth -> size co-training
DEFAULT_STEPS = {"size0": 32_768, "depth0": 65_536, "size1": 16_384, "depth2": 32_768, "size3": 16_384}


def measure_query_ms(policy: LtdPolicy, repeats: int = 50) -> tuple[float, float]:
    """Mean ms of one depth query and of one size query (random scores of a full-depth round), each timed with
    the caches flushed first, as a target forward leaves them in a round (several times a warm query's time)."""
    k, d = policy.config.top_k, policy.config.max_depth
    scores = -torch.rand(k + d * k * k).sort(descending=True).values * 10
    parents = torch.zeros(1 + scores.numel(), dtype=torch.long)
    parents[0] = -1
    tree = DraftTree(torch.zeros_like(parents), parents, torch.cat([torch.zeros(1), scores]))
    depth_s = size_s = 0.0
    for i in range(repeats):
        calls = i % d
        evict_caches()
        start = time.perf_counter()
        policy.keep_going(calls, scores[:k], scores[: k + calls * k * k])
        depth_s += time.perf_counter() - start
        evict_caches()
        start = time.perf_counter()
        policy.verify_size(tree, max(policy.config.sizes))
        size_s += time.perf_counter() - start
    return depth_s * 1000 / repeats, size_s * 1000 / repeats
