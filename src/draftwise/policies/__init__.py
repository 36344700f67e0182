"""Tree policies: how many draft calls to make and how many candidates to verify, each round.

Every policy answers EagleDrafter's TreePolicy questions (drafters/eagle.py): a stop rule asked before each
expansion call and a verification size. `fixed` is EAGLE-2; `threshold` and `heuristic` are hand-written
baselines (baselines.py); `radar` (radar.py) and `ltd` (ltd.py) are learned offline from logged rounds
(logger.py, offline.py) for this machine's cost model (draftwise.policies.cost) by `draftwise train-policy`
(train.py). Trained policies ship under data/policies/<model>/, with a `sampling/` fit beside the greedy one
where one was made (`PerMode`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

from draftwise.core.drafter import DraftContext
from draftwise.core.errors import DraftwiseError
from draftwise.core.tree import DraftTree
from draftwise.core.verify import Sampling
from draftwise.drafters.eagle import EAGLE2_TREE, EagleDrafter, TreePolicy, default_shape, target_compute
from draftwise.heads.model import DraftHead
from draftwise.policies.cost import fit_dir

POLICY_NAMES = ("fixed", "threshold", "heuristic", "radar", "ltd")
SAMPLING_FIT = "sampling"  # a policy directory's subdirectory: the same policies fitted to sampled text


def policy_dir(model_name: str, compute: str | None = None) -> Path:
    """The shipped policies for a model: those fitted to the cost model of the target's `compute` on this kind of
    CPU where they exist (`profile.fit_dir`), else those for the compute, else the model's default (fp32) fit."""
    fitted = fit_dir(model_name, compute)
    candidates = [fitted, fitted.with_name(fitted.name.removesuffix("-avx2")), fit_dir(model_name)]
    return next(d for d in candidates if (d / "cost.json").exists() or d == candidates[-1])


class PerMode(TreePolicy):
    """A learned policy fitted twice, on greedy decoding's rounds and on sampled text's (`log-rounds --trajectory
    sampled`): less of sampled text is accepted, so smaller trees pay there. Rounds at or above the temperature the
    sampling fit's text was drawn at ask that fit, the others the greedy one (at T = 0.7 with top-p 0.95 the greedy
    fit ran as fast or faster, at T = 1 the sampling fit did: benchmarks/RESULTS.md). Both share one tree shape."""

    def __init__(self, greedy: TreePolicy, sampling: TreePolicy, temperature: float = 1.0):
        self.greedy, self.sampling, self.active, self.temperature = greedy, sampling, greedy, temperature
        self.name, self.config = greedy.name, greedy.config

    def use(self, sampling: Sampling) -> None:
        self.active = self.sampling if sampling.temperature >= self.temperature else self.greedy

    def begin_round(self, committed: int):
        return self.active.begin_round(committed)

    def verify_size(self, candidates: DraftTree, budget: int) -> int:
        return self.active.verify_size(candidates, budget)

    def observe(self, result) -> None:
        self.active.observe(result)

    @property
    def queries(self) -> int:
        return self.greedy.queries + self.sampling.queries

    @property
    def query_s(self) -> float:
        return self.greedy.query_s + self.sampling.query_s


def load_fits(load: Callable[[Path], TreePolicy], directory: Path) -> TreePolicy:
    """The policy `load` reads from `directory`, paired with its sampling fit where `directory` has one (the
    temperature of that fit's rounds comes from the record `train-policy` left beside it, T = 1 where it names
    none)."""
    policy, fit_dir = load(directory), directory / SAMPLING_FIT
    if not fit_dir.is_dir():
        return policy
    sampling = load(fit_dir)
    shape = ("top_k", "depth", "size", "max_depth", "sizes")
    if any(getattr(policy.config, f, None) != getattr(sampling.config, f, None) for f in shape):
        raise DraftwiseError(f"the {policy.name} fits in {directory} and its {SAMPLING_FIT}/ draft different trees")
    record = fit_dir / f"{policy.name}-validation.json"
    logged = json.loads(record.read_text()).get("logged", {}) if record.exists() else {}
    return PerMode(policy, sampling, float(logged.get("temperature", 1.0)))


class TreeEagleDrafter(EagleDrafter):
    """EagleDrafter whose every round a TreePolicy shapes, in both decoding modes: at T > 0 it drafts the same
    deterministic EAGLE-2 tree as in greedy mode (instead of a sampled chain), verified by the one-hot-q rule
    of accept_sampling, which keeps it lossless (as EAGLE-2/3 and RADAR do at T = 1)."""

    def _sampled_chain(
        self, root: int, root_logits, root_hidden, committed: int, budget: int, context: DraftContext
    ) -> DraftTree:
        return self._tree(root, root_logits, root_hidden, committed, budget)


def make_policy(
    name: str, model_name: str, depth: int, directory: Path | None = None, seed: int = 0, compute: str | None = None
) -> TreePolicy:
    """A policy by name; radar and ltd load their trained weights from `directory` (default: shipped, for the
    target's `compute`), with its sampling fit where there is one."""
    from draftwise.policies.baselines import ConfidenceThreshold, HeuristicSchedule

    if name == "fixed":
        return TreePolicy()
    if name == "threshold":
        return ConfidenceThreshold()
    if name == "heuristic":
        return HeuristicSchedule(max_calls=depth)
    if name == "radar":
        from draftwise.policies.radar import RadarPolicy

        return load_fits(functools.partial(RadarPolicy.load, seed=seed), directory or policy_dir(model_name, compute))
    if name == "ltd":
        from draftwise.policies.ltd import LtdPolicy

        return load_fits(LtdPolicy.load, directory or policy_dir(model_name, compute))
    raise DraftwiseError(f"unknown policy '{name}'; choose one of {', '.join(POLICY_NAMES)}")


def policy_and_shape(
    policy: str | TreePolicy,
    model_name: str,
    policy_dir: str | None = None,
    compute: str = "float32",
    **options,
) -> tuple[TreePolicy, dict]:
    """A policy (by name or object) and the tree shape it drafts: learned policies bring the shape they were
    trained for (top-k, depth, verified size), the others the tuned shape for the target's `compute`; explicit options
    override depth and size, not top-k."""
    from draftwise.policies.ltd import LtdPolicy
    from draftwise.policies.radar import RadarPolicy

    shape = default_shape(compute) if policy == "fixed" else dict(EAGLE2_TREE)  # stop rules need depth to stop in
    if isinstance(policy, str):
        if policy in ("radar", "ltd"):
            directory = Path(policy_dir) if policy_dir else None
            policy = make_policy(policy, model_name, shape["depth"], directory, compute=compute)
        else:
            policy = make_policy(policy, model_name, options.get("depth") or shape["depth"])
    fit = policy.greedy if isinstance(policy, PerMode) else policy
    if isinstance(fit, RadarPolicy):
        c = policy.config
        shape = {"top_k": c.top_k, "depth": c.depth, "total_tokens": c.size}
    elif isinstance(fit, LtdPolicy):
        c = policy.config
        shape = {"top_k": c.top_k, "depth": c.max_depth, "total_tokens": max(c.sizes)}
    if isinstance(fit, RadarPolicy | LtdPolicy) and options.get("top_k") not in (None, shape["top_k"]):
        raise DraftwiseError(f"the {policy.name} policy was trained for a top-k of {shape['top_k']}")
    shape.update({k: v for k, v in options.items() if v is not None})
    return policy, shape


def policy_drafter(
    head: DraftHead, policy: str | TreePolicy, model_name: str, policy_dir: str | None = None, **options
) -> TreeEagleDrafter:
    """An eagle drafter driven by `policy` (a name or a TreePolicy)."""
    policy, shape = policy_and_shape(policy, model_name, policy_dir, target_compute(head), **options)
    drafter = TreeEagleDrafter(head, policy=policy, **shape)
    drafter.name = policy.name if policy.name in ("radar", "ltd") else f"eagle-{policy.name}"
    return drafter


__all__ = [
    "POLICY_NAMES",
    "PerMode",
    "TreeEagleDrafter",
    "make_policy",
    "policy_and_shape",
    "policy_dir",
    "policy_drafter",
]
