"""What one speculative round costs on this machine: the `CostModel` that `draftwise profile` fits and saves, and
where the cost model and the policies fitted to it live for each target compute mode.

A round costs a fixed overhead (tree building, acceptance, KV compaction, detokenising), the draft-head calls
(one catch-up call over the newly accepted tokens, then one per expansion over the top-k frontier) and one
target forward over the verified tree:

    t(draft_calls, N, context) = overhead + head(first_width) + (draft_calls - 1) * head(width) + verify(N)
                                 + call_extra * draft_calls + node_extra * (N - 1)

head() and verify() are piecewise-linear in their size argument (linear interpolation between measured sizes,
because a CPU's cost jumps where kernels change, e.g. 1 -> 2 tokens) and linear in the context length at
each measured size (least squares). How they are measured: draftwise.policies.learn.measure. RADAR's and LTD's
rewards are in these seconds, so re-profiling and re-training on another machine takes minutes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from draftwise.core.errors import DraftwiseError
from draftwise.core.files import write_atomic
from draftwise.core.machine import cache_dir, cpu_has_native_bf16
from draftwise.core.target import ComputeMode

POLICIES_DIR = Path(__file__).resolve().parent.parent / "data" / "policies"


@dataclass
class PiecewiseLinear:
    """cost_ms(x, context) = base(x) + slope(x) * context / 1000, base and slope interpolated linearly between
    the knots `x` (and extrapolated along the end segments)."""

    x: list[float]
    base_ms: list[float]
    slope_ms_per_1k: list[float]

    def __call__(self, x, context):
        """ms at size `x` and `context` tokens; floats give a float, arrays an array."""
        xs = np.asarray(self.x, dtype=float)
        x_arr = np.asarray(x, dtype=float)
        base = _interp(x_arr, xs, np.asarray(self.base_ms, dtype=float))
        slope = _interp(x_arr, xs, np.asarray(self.slope_ms_per_1k, dtype=float))
        cost = np.maximum(base + slope * (np.asarray(context, dtype=float) / 1000), 0.0)
        return float(cost) if cost.ndim == 0 else cost

    @classmethod
    def fit(cls, samples: Sequence[tuple[float, float, float]]) -> PiecewiseLinear:
        """Least squares per distinct x over (x, context, ms) samples; one context at an x gives slope 0."""
        by_x: dict[float, list[tuple[float, float]]] = {}
        for x, context, ms in samples:
            by_x.setdefault(float(x), []).append((float(context), float(ms)))
        if not by_x:
            raise ValueError("no samples to fit")
        xs, bases, slopes = [], [], []
        for x in sorted(by_x):
            ctx = np.array([c for c, _ in by_x[x]]) / 1000
            ms = np.array([m for _, m in by_x[x]])
            if len(set(ctx.tolist())) > 1:
                (base, slope), *_ = np.linalg.lstsq(np.stack([np.ones_like(ctx), ctx], 1), ms, rcond=None)
            else:
                base, slope = ms.mean(), 0.0
            xs.append(x)
            bases.append(round(float(base), 4))
            slopes.append(round(float(slope), 4))
        return cls(xs, bases, slopes)


def _interp(x: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Linear interpolation through (xs, ys), extended along the first and last segments."""
    if len(xs) == 1:
        return np.full_like(x, ys[0])
    y = np.interp(x, xs, ys)
    below = ys[0] + (ys[1] - ys[0]) * (x - xs[0]) / (xs[1] - xs[0])
    above = ys[-2] + (ys[-1] - ys[-2]) * (x - xs[-2]) / (xs[-1] - xs[-2])
    return np.where(x < xs[0], below, np.where(x > xs[-1], above, y))


@dataclass
class CostModel:
    """Seconds of a speculative round on the profiled machine (see the module docstring)."""

    head: PiecewiseLinear  # ms of one draft-head call by frontier width
    verify: PiecewiseLinear  # ms of one target forward by tree size N (root included)
    round_overhead_ms: float
    meta: dict = field(default_factory=dict)
    # ms of one query of each learned policy ("radar", "ltd_depth", "ltd_size"), timed inside real rounds
    policy_query_ms: dict[str, float] = field(default_factory=dict)
    # what real rounds cost beyond the isolated head and verify timings, per draft call and per verified node
    # past the root (fitted with the overhead on rounds of random shapes: `fit_in_place`)
    call_extra_ms: float = 0.0
    node_extra_ms: float = 0.0

    def head_s(self, width, context):
        return self.head(width, context) / 1000

    def verify_s(self, size, context):
        return self.verify(size, context) / 1000

    def round_s(self, draft_calls, size, context, width=8, first_width=3):
        """t(draft_calls, N, context) in seconds: one round with `draft_calls` head calls (the first is the catch-up
        call over about `first_width` accepted tokens) and a verified tree of `size` nodes. Arrays broadcast."""
        calls = np.asarray(draft_calls, dtype=float)
        draft = np.where(
            calls > 0, self.head_s(first_width, context) + np.maximum(calls - 1, 0) * self.head_s(width, context), 0.0
        )
        extra = self.call_extra_ms * calls + self.node_extra_ms * np.maximum(np.asarray(size, dtype=float) - 1, 0)
        total = (self.round_overhead_ms + extra) / 1000 + draft + self.verify_s(size, context)
        return float(total) if np.ndim(total) == 0 else total

    def to_json(self) -> dict:
        return {
            "meta": self.meta,
            "round_overhead_ms": round(self.round_overhead_ms, 3),
            "policy_query_ms": {k: round(v, 4) for k, v in self.policy_query_ms.items()},
            "call_extra_ms": round(self.call_extra_ms, 4),
            "node_extra_ms": round(self.node_extra_ms, 4),
            "head": self.head.__dict__,
            "verify": self.verify.__dict__,
        }

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def from_json(cls, raw: dict) -> CostModel:
        head, verify = PiecewiseLinear(**raw["head"]), PiecewiseLinear(**raw["verify"])
        extras = {k: raw.get(k, 0.0) for k in ("call_extra_ms", "node_extra_ms")}
        return cls(head, verify, raw["round_overhead_ms"], raw["meta"], raw.get("policy_query_ms", {}), **extras)

    @classmethod
    def load(cls, path: Path) -> CostModel:
        path = Path(path)
        if not path.exists():
            raise DraftwiseError(f"no cost model at {path}; run `draftwise profile` on this machine first")
        return cls.from_json(json.loads(path.read_text()))


# The one fit that ships, for the default engine on CPUs with AVX-512 VNNI; fits for other compute modes are made
# on the machine itself (`profile`, then `train-policy`) and live in the user's cache.
SHIPPED_FIT = "float32-w4a8"


def user_policies_dir() -> Path:
    """Where `profile` and `train-policy` write: the user's cache, never the installed package."""
    return cache_dir() / "policies"


def fit_subdir(model_name: str, compute: ComputeMode | None = None) -> Path:
    """A model's fit for a target computing in `compute`, relative to a policies root: the model's directory for
    fp32, a subdirectory per compute otherwise (e.g. `bfloat16-int4/`). bf16 int4 on a CPU without native bf16
    gets its own (`bfloat16-int4-avx2/`): the same weights cost very differently there (docs/results.md)."""
    directory = Path(Path(model_name).name)
    if compute is None or compute == ComputeMode("float32"):
        return directory
    emulated_bf16 = compute == ComputeMode("bfloat16", "int4") and not cpu_has_native_bf16()
    return directory / (f"{compute.dir_name}-avx2" if emulated_bf16 else compute.dir_name)


def fit_dir(model_name: str, compute: ComputeMode | None = None) -> Path:
    """The user's own fit directory for `model_name` and `compute`."""
    return user_policies_dir() / fit_subdir(model_name, compute)


def default_cost_path(model_name: str, compute: ComputeMode | None = None) -> Path:
    return fit_dir(model_name, compute) / "cost.json"
