"""What one speculative round costs on this machine: `draftwise profile` and the `CostModel` it saves.

A round costs a fixed overhead (tree building, acceptance, KV compaction, detokenising), the draft-head calls
(one catch-up call over the newly accepted tokens, then one per expansion over the top-k frontier) and one
target forward over the verified tree:

    t(draft_calls, N, context) = overhead + head(first_width) + (draft_calls - 1) * head(width) + verify(N)
                                 + call_extra * draft_calls + node_extra * (N - 1)

head() and verify() are piecewise-linear in their size argument (linear interpolation between measured sizes,
because a CPU's cost jumps where kernels change, e.g. 1 -> 2 tokens) and linear in the context length at
each measured size (least squares). Both are timed twice: on their own in tight loops, and as they run in real
rounds of random tree shapes (`random_shape_rounds`); the in-place timings replace the isolated ones at every
size those rounds reach, because there a node cost 2-3x its tight-loop time and a head call ~1.5x (cold caches
after each forward; the loops' minimum is also optimistic on a noisy machine). The overhead and the two extras
are fitted on the same rounds. RADAR's and LTD's rewards are in these seconds, so re-profiling and re-training
on another machine takes minutes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from draftwise.drafters.eagle import TreePolicy
from draftwise.errors import DraftwiseError
from draftwise.models import cpu_has_native_bf16

POLICIES_DIR = Path(__file__).resolve().parent / "data" / "policies"
HEAD_WIDTHS = (1, 2, 3, 4, 6, 8, 12, 16)
VERIFY_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)
CONTEXTS = (64, 320, 768)


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
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

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


def fit_dir(model_name: str, compute: str | None = None) -> Path:
    """Where a model's cost model and policies for a target computing in `compute` live: the model's directory
    for fp32 (the original fit), a subdirectory per compute otherwise (e.g. `bfloat16-int4/`, the lean engine's).
    bf16 int4 on a CPU without native bf16 (where the grid kernel could not be built) gets its own
    (`bfloat16-int4-avx2/`): the same weights cost very differently there (a verified node ~25% of a step against
    ~13%, a head call ~15% against ~6%). fp32 on the GGUF grid (`float32-int4/`) runs only on such CPUs."""
    directory = POLICIES_DIR / Path(model_name).name
    if compute in (None, "float32"):
        return directory
    name = compute.replace("+", "-")
    return directory / (f"{name}-avx2" if compute == "bfloat16+int4" and not cpu_has_native_bf16() else name)


def default_cost_path(model_name: str, compute: str | None = None) -> Path:
    return fit_dir(model_name, compute) / "cost.json"


# --- measuring ---------------------------------------------------------------------------------------------------


@functools.cache
def _eviction_buffer() -> np.ndarray:
    return np.ones(64 << 20, dtype=np.uint8)


def evict_caches() -> None:
    """Read 64 MiB, more than a CPU's caches hold: a target forward streams the whole model through them, so the
    Python work of a round (a policy query, the tree bookkeeping) runs cold, up to ~20x slower than in a tight
    loop. Timing with this before each call measures that cost without loading a model."""
    _eviction_buffer().sum()


def timed(fn: Callable, key: Callable[..., tuple], samples: list[tuple]) -> Callable:
    """`fn`, appending `(*key(*args), ms)` to `samples` at each call; `key` runs before the call."""

    def call(*args):
        k, start = key(*args), time.perf_counter()
        out = fn(*args)
        samples.append((*k, 1000 * (time.perf_counter() - start)))
        return out

    return call


def best_ms(fn: Callable[[], object], repeats: int, before: Callable[[], object] | None = None) -> float:
    """The fastest of `repeats` timed calls after a warm-up: other work on the machine only ever adds time, so
    the minimum is the estimate least disturbed by it. `before` runs untimed ahead of every call."""
    fn()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return min(times)


@torch.inference_mode()
def measure_head(
    head, widths: Sequence[int], contexts: Sequence[int], repeats: int, before: Callable[[], object] | None = None
) -> list[tuple[int, int, float]]:
    """(width, context, ms) of one draft-head call over a frontier of `width` nodes; `before` runs untimed ahead of
    each call (a target forward, as in a round: on a CPU it evicts the head's weights from the caches, and a
    cache-hot call measured ~4x cheaper than a round's first one)."""
    from draftwise.draft_head import KVCache

    c = head.config
    weight = head.lm_head.weight
    samples = []
    for context in contexts:
        cache = KVCache(c.num_kv_heads, c.head_dim, context + 64, weight.dtype, weight.device)
        for width in widths:
            hidden = torch.randn(width, c.hidden_size, dtype=weight.dtype, device=weight.device)
            tokens = torch.randint(0, min(1000, c.target_vocab_size), (width,), device=weight.device)
            positions = torch.full((width,), context, device=weight.device)
            mask = torch.ones(width, context + width, dtype=torch.bool, device=weight.device)

            def call(cache=cache, hidden=hidden, tokens=tokens, positions=positions, mask=mask, context=context):
                cache.length = context
                head.step(hidden, tokens, positions, cache, mask)

            samples.append((width, context, best_ms(call, repeats * 3, before)))
    return samples


def measure_verify(target, sizes: Sequence[int], contexts: Sequence[int], repeats: int) -> list[tuple[int, int, float]]:
    """(N, context, ms) of one target tree forward of N nodes (a chain: the mask's shape does not change the cost)."""
    from draftwise.tree import DraftTree

    samples, vocab = [], min(1000, int(target.config.vocab_size))
    for context in contexts:
        target.prefill(torch.randint(0, vocab, (context,)))
        for n in sizes:
            tree = DraftTree(torch.randint(0, vocab, (n,)), torch.arange(-1, n - 1), torch.zeros(n))

            def verify(tree=tree, context=context):
                target.forward_tree(tree)
                target.truncate(context)

            samples.append((n, context, best_ms(verify, repeats)))
    return samples


class RandomShapes(TreePolicy):
    """A TreePolicy drawing each round's shape at random (0..`max_calls` expansion calls, V from `sizes`), so that
    the rounds `fit_in_place` times cover the shapes a policy can choose."""

    name = "random-shapes"

    def __init__(self, max_calls: int, sizes: Sequence[int], seed: int = 0):
        self.rng, self.max_calls, self.sizes = np.random.default_rng(seed), max_calls, list(sizes)

    def begin_round(self, committed: int):
        stop_at = int(self.rng.integers(self.max_calls + 1))
        return lambda calls, frontier_scores, candidate_scores: calls < stop_at

    def verify_size(self, candidates, budget: int) -> int:
        return min(budget, int(self.rng.choice(self.sizes)))


@dataclass
class InPlaceRounds:
    """Generations with random tree shapes, and every target forward and head call timed as they ran there:
    (size or width, context, ms) samples, as measure_verify and measure_head give them in isolation."""

    generations: list
    verify_ms: list[tuple[int, int, float]]
    head_ms: list[tuple[int, int, float]]


def random_shape_rounds(engine, head, prompts: Sequence[str], max_new_tokens: int) -> InPlaceRounds:
    """Generations whose every round has a random tree shape (`RandomShapes`), timing each forward and head call."""
    from draftwise.policies import TreeEagleDrafter

    target, verify_ms, head_ms = engine.target, [], []
    timed_forward = timed(target.forward_tree, lambda tree: (tree.size, target.length), verify_ms)
    timed_step = timed(head.step, lambda hidden, tokens, positions, cache, mask: (len(hidden), cache.length), head_ms)
    policy = RandomShapes(3, (1, 2, 3, 4, 6, 8, 12, 16))
    engine._drafters["profile"] = TreeEagleDrafter(head, policy=policy, top_k=8, depth=3, total_tokens=16)
    engine.generate("Say hi.", method="profile", max_new_tokens=8)  # warm-up
    target.forward_tree, head.step = timed_forward, timed_step
    try:
        out = [engine.generate(p, method="profile", max_new_tokens=max_new_tokens).stats for p in prompts]
    finally:
        del target.forward_tree, head.step  # the instance attributes; the methods show through again
        del engine._drafters["profile"]
    return InPlaceRounds(out, verify_ms, head_ms)


def in_place_samples(
    isolated: list[tuple[int, int, float]], in_place: list[tuple[int, int, float]], least: int = 20
) -> list[tuple[int, int, float]]:
    """The in-place samples at every size seen at least `least` times, the isolated ones at the other sizes;
    isolated sizes past the largest in-place one are scaled by the in-place / isolated ratio there (medians), so
    the curve does not drop where the sources meet."""
    by_size: dict[int, list[float]] = {}
    for x, _, ms in in_place:
        by_size.setdefault(x, []).append(ms)
    kept = {x for x, times in by_size.items() if len(times) >= least}
    if not kept:
        return list(isolated)
    top = max(kept)
    at_top = [ms for x, _, ms in isolated if x == top]
    ratio = statistics.median(by_size[top]) / statistics.median(at_top) if at_top else 1.0
    rest = [(x, c, ms * ratio if x > top else ms) for x, c, ms in isolated if x not in kept]
    return [r for r in in_place if r[0] in kept] + rest


def fit_in_place(generations: Sequence, partial: CostModel) -> tuple[float, float, float]:
    """(overhead, per draft call, per verified node past the root) in ms that the rounds of `generations` cost
    beyond the isolated timings of `partial`: least squares over every round, non-negative (a term that fits
    below zero is dropped). Isolated forwards run with the round's Python work hot in the caches; in a round it
    is cold, and the head call and the tree bookkeeping grow with the shape."""
    rows, residuals = [], []
    for stats in generations:
        context = stats.prompt_tokens - 1 + np.concatenate([[0], np.cumsum(stats.accepted)[:-1]])
        calls, size = np.asarray(stats.round_draft_calls, float), np.asarray(stats.round_verified, float)
        predicted = partial.round_s(calls, size, context, width=8, first_width=3)
        rows.append(np.stack([np.ones_like(calls), calls, size - 1], 1))
        residuals.append(1000 * (np.asarray(stats.round_s) - predicted))
    design, target = np.concatenate(rows), np.concatenate(residuals)
    keep = [0, 1, 2]
    while True:
        coef, *_ = np.linalg.lstsq(design[:, keep], target, rcond=None)
        if (coef >= 0).all() or len(keep) == 1:
            break
        keep.pop(int(np.argmin(coef)))
    fitted = dict(zip(keep, np.maximum(coef, 0.0), strict=True))
    return float(fitted.get(0, 0.0)), float(fitted.get(1, 0.0)), float(fitted.get(2, 0.0))


def measure_policy_queries(engine, head, prompts: Sequence[str], max_new_tokens: int) -> dict[str, float]:
    """Ms per query of RADAR's and LTD's policies, timed inside real generations: a query runs after a target
    forward and a head call, where its NumPy work runs ~5-10x slower than in a loop (the caches are cold).
    Untrained networks of the shipped shapes: what a query costs does not depend on the weights."""
    from draftwise.policies import TreeEagleDrafter
    from draftwise.policies.ltd import LtdConfig, LtdPolicy, actors
    from draftwise.policies.radar import RadarConfig, RadarNet, RadarPolicy

    times: dict[str, list[tuple]] = {"radar": [], "ltd_depth": [], "ltd_size": []}
    radar = RadarPolicy(RadarNet(8), RadarConfig(top_k=8, depth=3, sample=False))
    ltd = LtdPolicy(*actors(LtdConfig()), LtdConfig())
    no_key = lambda *args: ()  # noqa: E731
    radar.keep_going = timed(radar.keep_going, no_key, times["radar"])
    ltd.keep_going = timed(ltd.keep_going, no_key, times["ltd_depth"])
    ltd.verify_size = timed(ltd.verify_size, no_key, times["ltd_size"])
    for policy in (radar, ltd):
        engine._drafters["profile"] = TreeEagleDrafter(head, policy=policy, top_k=8, depth=3, total_tokens=6)
        for prompt in prompts:
            engine.generate(prompt, method="profile", max_new_tokens=max_new_tokens)
    del engine._drafters["profile"]
    return {name: statistics.fmean(ms for (ms,) in t) for name, t in times.items() if t}


def profile(
    model: str,
    dtype: str,
    draft_head: str | None,
    repeats: int,
    prompts: int,
    max_new_tokens: int,
    log: Callable[[str], None] = print,
    engine_name: str = "auto",
) -> CostModel:
    """Measure and fit this machine's cost model for `model` with its draft head (a random head of the default
    shape if none ships: a head call's cost does not depend on its weights)."""
    from draftwise.draft_head import DraftHead, DraftHeadConfig
    from draftwise.drafters.eagle import load_head
    from draftwise.engine import Engine

    load = os.getloadavg()[0]
    if load > 1.0:
        log(f"warning: load average {load:.1f}: other work on this machine will inflate the timings")
    engine = Engine.load(model, method="ar", dtype=dtype, engine=engine_name, backoff="off")  # time every shape
    try:
        head = load_head(engine, draft_head)
        head_source = draft_head or "shipped"
    except DraftwiseError:
        config = engine.model.config
        layers = (2, config.num_hidden_layers // 2, config.num_hidden_layers - 3)
        head = DraftHead(DraftHeadConfig.from_target(config, layers, min(8192, config.vocab_size)))
        head = head.to(engine.model.dtype).eval().attach_embedding(engine.model.get_input_embeddings().weight)
        head_source = "random (no trained head found)"
    log(f"head calls ({head_source}) by frontier width {HEAD_WIDTHS} at contexts {CONTEXTS}, each after a verify ...")
    from draftwise.tree import DraftTree

    target, probe, root = engine.target, torch.tensor([1, 2]), DraftTree.root_only(3)

    @torch.inference_mode()
    def verify_first() -> None:  # what runs before a round's head calls: a target forward over the last tree
        target.prefill(probe)
        target.forward_tree(root)

    head_samples = measure_head(head, HEAD_WIDTHS, CONTEXTS, repeats, verify_first)
    log(f"target verify forwards by tree size {VERIFY_SIZES} at contexts {CONTEXTS} ...")
    verify_samples = measure_verify(engine.target, VERIFY_SIZES, CONTEXTS, repeats)
    meta = {
        "model": model,
        "dtype": str(engine.model.dtype).removeprefix("torch."),
        "engine": engine.engine_name,
        "compute": engine.target.dtype_name,
        "device": str(engine.target.device),
        "threads": torch.get_num_threads(),
        "head": head_source,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_average": round(load, 2),
        "samples": {"head_ms": head_samples, "verify_ms": verify_samples},
    }
    cost = CostModel(PiecewiseLinear.fit(head_samples), PiecewiseLinear.fit(verify_samples), 0.0, meta)
    if prompts > 0:
        from draftwise.training.distill import sharegpt_prompts

        log(f"real rounds of random shapes over {prompts} generations of {max_new_tokens} tokens ...")
        texts = sharegpt_prompts(3000 + prompts, seed=0)[3000:]  # past the draft head's training prompts
        rounds = random_shape_rounds(engine, head, texts, max_new_tokens)
        # Forwards and head calls as they ran in those rounds: a tree node cost 2-3x its isolated time there (the
        # minimum of tight loops), a head call ~1.5x. Sizes the rounds did not reach keep the isolated timings.
        cost.verify = PiecewiseLinear.fit(in_place_samples(verify_samples, rounds.verify_ms))
        cost.head = PiecewiseLinear.fit(in_place_samples(head_samples, rounds.head_ms))
        meta["samples"].update(in_place_verify_ms=rounds.verify_ms, in_place_head_ms=rounds.head_ms)
        extras = fit_in_place(rounds.generations, cost)
        cost.round_overhead_ms, cost.call_extra_ms, cost.node_extra_ms = extras
        log("policy queries inside real rounds ...")
        cost.policy_query_ms = measure_policy_queries(engine, head, texts, max_new_tokens)
    return cost


def cmd_profile(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise DraftwiseError("--repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    options = (args.draft_head, args.repeats, args.prompts, args.max_new_tokens)
    cost = profile(args.model, args.dtype, *options, engine_name=args.engine)
    out = Path(args.out) if args.out else default_cost_path(args.model, cost.meta["compute"])
    cost.save(out)
    print(
        f"in real rounds: overhead {cost.round_overhead_ms:.2f} ms, +{cost.call_extra_ms:.3f} ms a draft call, "
        f"+{cost.node_extra_ms:.3f} ms a verified node"
    )
    for name, ms in cost.policy_query_ms.items():
        print(f"policy query, {name}: {ms:.3f} ms")
    for width in (1, 3, 8):
        print(f"head call, width {width:>2}, context 300: {cost.head(width, 300):6.2f} ms")
    for n in (1, 2, 4, 8, 16, 32, 64):
        print(f"verify N={n:>2}, context 300: {cost.verify(n, 300):6.1f} ms")
    print(f"saved {out}; fit policies to it with `draftwise train-policy --method radar|ltd --cost {out}`")
    return 0


def register(commands) -> None:
    parser = commands.add_parser("profile", help="measure this machine's round cost model (for tree policies)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto", help="auto | bf16 | fp32 (default: auto, what generation uses)")
    parser.add_argument("--engine", default="auto", help="auto | lean | hf: the engine whose costs to measure")
    parser.add_argument("--draft-head", default=None, help="draft head directory (default: shipped)")
    parser.add_argument(
        "--out",
        default=None,
        help="JSON path (default: data/policies/<model>/[<compute>/]cost.json, where `--method radar|ltd` look for "
        "the policies of a target computing in <compute>)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (the fastest counts)")
    parser.add_argument(
        "--prompts", type=int, default=8, help="generations of random tree shapes, to fit what real rounds add"
    )
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.set_defaults(func=cmd_profile)
