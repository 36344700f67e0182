"""Tree policies: how many draft calls to make and how many candidates to verify, each round.

Every policy answers EagleDrafter's TreePolicy questions (drafters/eagle.py): a stop rule asked before each
expansion call and a verification size. `fixed` is EAGLE-2; `threshold` and `heuristic` are hand-written
baselines (baselines.py); `radar` (radar.py) and `ltd` (ltd.py) are learned offline from logged rounds
(logger.py, offline.py) for this machine's cost model (draftwise.profile) by `draftwise train-policy`
(train.py). Trained policies ship under data/policies/<model>/.
"""

from __future__ import annotations

from pathlib import Path

from draftwise.draft_head import DraftHead
from draftwise.drafters.base import DraftContext
from draftwise.drafters.eagle import EAGLE2_TREE, EagleDrafter, TreePolicy, default_shape, target_compute
from draftwise.errors import DraftwiseError
from draftwise.profile import fit_dir
from draftwise.tree import DraftTree

POLICY_NAMES = ("fixed", "threshold", "heuristic", "radar", "ltd")


def policy_dir(model_name: str, compute: str | None = None) -> Path:
    """The shipped policies for a model: those fitted to the cost model of the target's `compute` on this kind of
    CPU where they exist (`profile.fit_dir`), else those for the compute, else the model's default (fp32) fit."""
    fitted = fit_dir(model_name, compute)
    candidates = [fitted, fitted.with_name(fitted.name.removesuffix("-avx2")), fit_dir(model_name)]
    return next(d for d in candidates if (d / "cost.json").exists() or d == candidates[-1])


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
    target's `compute`)."""
    from draftwise.policies.baselines import ConfidenceThreshold, HeuristicSchedule

    if name == "fixed":
        return TreePolicy()
    if name == "threshold":
        return ConfidenceThreshold()
    if name == "heuristic":
        return HeuristicSchedule(max_calls=depth)
    if name == "radar":
        from draftwise.policies.radar import RadarPolicy

        return RadarPolicy.load(directory or policy_dir(model_name, compute), seed=seed)
    if name == "ltd":
        from draftwise.policies.ltd import LtdPolicy

        return LtdPolicy.load(directory or policy_dir(model_name, compute))
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
    if isinstance(policy, RadarPolicy):
        c = policy.config
        shape = {"top_k": c.top_k, "depth": c.depth, "total_tokens": c.size}
    elif isinstance(policy, LtdPolicy):
        c = policy.config
        shape = {"top_k": c.top_k, "depth": c.max_depth, "total_tokens": max(c.sizes)}
    if isinstance(policy, RadarPolicy | LtdPolicy) and options.get("top_k") not in (None, shape["top_k"]):
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


__all__ = ["POLICY_NAMES", "TreeEagleDrafter", "make_policy", "policy_and_shape", "policy_dir", "policy_drafter"]
