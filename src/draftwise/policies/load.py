"""Tree policies by name: the shipped fits for a model and the target's compute mode, and the tree shape each
policy drafts.

Every policy answers EagleDrafter's TreePolicy questions (draftwise.drafters.tree_policy): a stop rule asked before
each expansion call and a verification size. `fixed` is EAGLE-2; `threshold` and `heuristic` are hand-written
baselines (baselines.py); `radar` (radar.py) and `ltd` (ltd.py) are learned offline from logged rounds
(learn/) for this machine's cost model (cost.py) by `draftwise train-policy`. Trained policies ship under
data/policies/<model>/, with a `sampling/` fit beside the greedy one where one was made (`PerMode`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

from draftwise.core.errors import DraftwiseError
from draftwise.core.target import ComputeMode
from draftwise.drafters.eagle import EAGLE2_TREE, FLOAT32, default_shape
from draftwise.drafters.tree_policy import TreePolicy
from draftwise.policies.baselines import ConfidenceThreshold, HeuristicSchedule
from draftwise.policies.cost import POLICIES_DIR, SHIPPED_FIT, fit_subdir, user_policies_dir
from draftwise.policies.ltd import LtdPolicy
from draftwise.policies.per_mode import PerMode
from draftwise.policies.radar import RadarPolicy

POLICY_NAMES = ("fixed", "threshold", "heuristic", "radar", "ltd")
SAMPLING_FIT = "sampling"  # a policy directory's subdirectory: the same policies fitted to sampled text


def policy_dir(model_name: str, compute: ComputeMode | None = None, name: str | None = None) -> Path:
    """Where policy `name` (any, if None) is loaded from: the user's own fit for the target's `compute` (made by
    `profile` and `train-policy`) where there is one, else the shipped fit for it, else the shipped default."""
    fitted = fit_subdir(model_name, compute)
    relatives = [fitted, fitted.with_name(fitted.name.removesuffix("-avx2"))]
    candidates = [root / r for root in (user_policies_dir(), POLICIES_DIR) for r in relatives]
    candidates.append(POLICIES_DIR / Path(model_name).name / SHIPPED_FIT)
    marker = f"{name}.safetensors" if name else "cost.json"
    return next(d for d in candidates if (d / marker).exists() or d == candidates[-1])


def load_fits(load: Callable[[Path], TreePolicy], directory: Path) -> TreePolicy:
    """The policy `load` reads from `directory`, paired with its sampling fit where `directory` has one (the
    temperature of that fit's rounds comes from the record `train-policy` left beside it, T = 1 where it names
    none)."""
    policy, sampling_dir = load(directory), directory / SAMPLING_FIT
    if not sampling_dir.is_dir():
        return policy
    sampling = load(sampling_dir)
    shape = ("top_k", "depth", "size", "max_depth", "sizes")
    if any(getattr(policy.config, f, None) != getattr(sampling.config, f, None) for f in shape):
        raise DraftwiseError(f"the {policy.name} fits in {directory} and its {SAMPLING_FIT}/ draft different trees")
    record = sampling_dir / f"{policy.name}-validation.json"
    logged = json.loads(record.read_text()).get("logged", {}) if record.exists() else {}
    return PerMode(policy, sampling, float(logged.get("temperature", 1.0)))


def make_policy(
    name: str,
    model_name: str,
    depth: int,
    directory: Path | None = None,
    seed: int = 0,
    compute: ComputeMode | None = None,
) -> TreePolicy:
    """A policy by name; radar and ltd load their trained weights from `directory` (default: shipped, for the
    target's `compute`), with its sampling fit where there is one."""
    if name == "fixed":
        return TreePolicy()
    if name == "threshold":
        return ConfidenceThreshold()
    if name == "heuristic":
        return HeuristicSchedule(max_calls=depth)
    if name == "radar":
        radar_dir = directory or policy_dir(model_name, compute, "radar")
        return load_fits(functools.partial(RadarPolicy.load, seed=seed), radar_dir)
    if name == "ltd":
        return load_fits(LtdPolicy.load, directory or policy_dir(model_name, compute, "ltd"))
    raise DraftwiseError(f"unknown policy '{name}'; choose one of {', '.join(POLICY_NAMES)}")


def policy_and_shape(
    policy: str | TreePolicy,
    model_name: str,
    policy_dir: str | None = None,
    compute: ComputeMode = FLOAT32,
    **options,
) -> tuple[TreePolicy, dict]:
    """A policy (by name or object) and the tree shape it drafts: learned policies bring the shape they were
    trained for (top-k, depth, verified size), the others the tuned shape for the target's `compute`; explicit options
    override depth and size, not top-k."""
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
