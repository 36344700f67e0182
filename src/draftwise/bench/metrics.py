"""Benchmark metrics from per-prompt records: Spec-Bench's tokens/s, speedup and τ; the losslessness check.

A record is one (question, method) pair as stored in results.json: `{"index", "question_id", "category",
"method", "error", "verdict", "peak_rss_mb", "peak_gpu_mb", "turns": [turn, ...]}`, where a turn has
`new_tokens`, `wall_s`, `token_ids`, `text`, `margins` and `stats` (both from the engine's GenerationStats,
`accepted` included; None for peers that run outside the engine).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from draftwise.core.verify import NEAR_TIE_EPSILON, compare_greedy

VERDICTS = ("identical", "near_tie", "mismatch")  # what compare_greedy answers
BASELINE = "ar"
TORCH_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def tie_epsilon(dtype: str) -> float:
    """The near-tie threshold for a model dtype, by torch name ("bfloat16") or ours ("bf16")."""
    return NEAR_TIE_EPSILON[TORCH_DTYPES.get(dtype, dtype)]


# Plain decoding, one per arithmetic: lean `ar`, draftwise's loop on transformers, transformers' own generate,
# llama.cpp. A different arithmetic is a different model, so each method is held to the one it runs on.
REFERENCES = (BASELINE, "ar@hf", "hf", "ar@llama")


def reference_candidates(name: str) -> tuple[str, ...]:
    """The plain decodings a greedy method must equal token for token, the first one run being used: the one on
    its own arithmetic. Empty for the references themselves."""
    if name in REFERENCES:
        return ()
    if name.endswith("@llama") or name.startswith("llama.cpp"):
        return ("ar@llama",)
    if name.endswith("@hf"):
        return ("ar@hf", "hf")
    if name.startswith("hf"):  # transformers' own peers (hf-pld)
        return ("hf", "ar@hf")
    return (BASELINE,)


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where the sequences differ (a length difference counts), else None."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_turns(ref: dict, record: dict, epsilon: float) -> tuple[str, dict | None]:
    """(verdict, divergence) of `record` against `ref`: the first turn that differs decides, since later turns are
    asked after different answers."""
    tie = NEAR_TIE_EPSILON["gguf"] if ref["method"] == "ar@llama" else epsilon
    for turn_index, (ref_turn, turn) in enumerate(zip(ref["turns"], record["turns"], strict=True)):
        verdict = compare_greedy(ref_turn["token_ids"], ref_turn["margins"] or [], turn["token_ids"], tie)
        if verdict != "identical":
            position = first_difference(ref_turn["token_ids"], turn["token_ids"])
            margins = ref_turn["margins"]
            margin = margins[position] if margins is not None and position < len(margins) else None
            return verdict, {"turn": turn_index, "position": position, "ref_margin": margin}
    return "identical", None


def assign_verdicts(records: list[dict], epsilon: float) -> None:
    """Set `verdict` (verify.compare_greedy against the plain decoding of the method's own arithmetic) and
    `divergence` (turn, token position, the reference's margin there) on every successful record that has a
    reference answer. References of another arithmetic than `ar` get `cross_engine` instead: how far they agree
    with `ar`, which is not a losslessness check."""
    answered = {(r["method"], r["index"]): r for r in records if not r["error"]}
    for record in records:
        if record["error"]:
            continue
        if record["method"] in REFERENCES:
            ar = answered.get((BASELINE, record["index"]))
            if record["method"] != BASELINE and ar is not None:
                verdict, divergence = compare_turns(ar, record, epsilon)
                record["cross_engine"] = {"verdict": verdict, "divergence": divergence}
            continue
        found = (answered.get((m, record["index"])) for m in reference_candidates(record["method"]))
        ref = next((r for r in found if r is not None), None)
        if ref is None:
            continue
        record["verdict"], divergence = compare_turns(ref, record, epsilon)
        record["reference"] = ref["method"]
        if divergence is not None:
            record["divergence"] = divergence


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def summarize(records: list[dict]) -> dict:
    """One method's numbers over a set of records (one category, or all)."""
    ok = [r for r in records if not r["error"]]
    turns = [t for r in ok for t in r["turns"]]
    new_tokens = sum(t["new_tokens"] for t in turns)
    wall_s = sum(t["wall_s"] for t in turns)
    per_question = [_ratio(sum(t["new_tokens"] for t in r["turns"]), sum(t["wall_s"] for t in r["turns"])) for r in ok]
    per_question = [x for x in per_question if x is not None]
    stats = [t["stats"] for t in turns if t["stats"] is not None]
    rounds = sum(s["rounds"] for s in stats)
    accepted = [a for s in stats for a in s["accepted"]]
    split = {k: sum(s[k] for s in stats) for k in ("prefill_s", "draft_s", "verify_s", "overhead_s")}
    verdicts = [r["verdict"] for r in ok if r.get("verdict")]
    ttfts = [t["ttft_s"] for t in turns if t.get("ttft_s") is not None]
    return {
        "questions": len(ok),
        "errors": len(records) - len(ok),
        "new_tokens": new_tokens,
        "wall_s": wall_s,
        "tokens_per_s": _ratio(new_tokens, wall_s),  # Spec-Bench: total tokens / total time
        "tokens_per_s_mean": sum(per_question) / len(per_question) if per_question else None,
        "ttft_s": sum(ttfts) / len(ttfts) if ttfts else None,  # mean time to first token
        "tau": sum(accepted) / len(accepted) if accepted else None,  # bonus token included
        "draft_calls_per_round": _ratio(sum(s["draft_calls"] for s in stats), rounds),
        "verified_per_round": _ratio(sum(s["verified_tokens"] for s in stats), rounds),
        # rounds the back-off ran without drafting (draftwise.core.backoff); None for peers and runs before it existed
        "plain_round_share": _ratio(sum(s["plain_rounds"] for s in stats), rounds)
        if stats and all("plain_rounds" in s for s in stats)
        else None,
        # a tree policy's own time per query, measured in place (None for methods without one)
        "policy_ms_per_query": _ratio(
            1000 * sum(s.get("policy_s", 0.0) for s in stats), sum(s.get("policy_queries", 0) for s in stats)
        ),
        "time_split_s": split if stats else None,
        "peak_rss_mb": max((r["peak_rss_mb"] for r in ok if r.get("peak_rss_mb")), default=None),
        "peak_gpu_mb": max((r["peak_gpu_mb"] for r in ok if r.get("peak_gpu_mb")), default=None),
        **{v: verdicts.count(v) for v in VERDICTS},
    }


def speedup_interval(
    records: list[dict], method: str, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """A bootstrap interval for `method`'s speedup over the baseline: the questions both answered are resampled
    with replacement, and each resample's speedup is computed as the headline one is (total tokens over total
    time, for each method). It shows how much the figure depends on which questions were asked; it does not
    cover the machine's drift between runs. None with fewer than 3 such questions."""

    def totals(m: str) -> dict[int, tuple[int, float]]:
        return {
            r["index"]: (sum(t["new_tokens"] for t in r["turns"]), sum(t["wall_s"] for t in r["turns"]))
            for r in records
            if r["method"] == m and not r["error"]
        }

    mine, base = totals(method), totals(BASELINE)
    shared = sorted(mine.keys() & base.keys())
    if len(shared) < 3:
        return None
    a = np.array([mine[q] for q in shared], dtype=float)
    b = np.array([base[q] for q in shared], dtype=float)
    picks = np.random.default_rng(seed).integers(0, len(shared), (resamples, len(shared)))
    ratios = (a[picks, 0].sum(1) / a[picks, 1].sum(1)) / (b[picks, 0].sum(1) / b[picks, 1].sum(1))
    low, high = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def aggregate(records: list[dict], methods: list[str]) -> dict:
    """Per method, overall and per category, with speedup = tokens/s over the baseline's in the same scope and
    its bootstrap interval over the scope's questions."""

    def scope(subset: list[dict], intervals: bool = False) -> dict[str, dict]:
        rows = {m: summarize([r for r in subset if r["method"] == m]) for m in methods}
        base = rows.get(BASELINE, {}).get("tokens_per_s")
        for method, row in rows.items():
            row["speedup"] = row["tokens_per_s"] / base if base and row["tokens_per_s"] is not None else None
            if intervals and method != BASELINE and base:
                row["speedup_ci95"] = speedup_interval(subset, method)
        return rows

    categories = list(dict.fromkeys(r["category"] for r in records))
    return {
        "overall": scope(records, intervals=True),
        "categories": {c: scope([r for r in records if r["category"] == c], intervals=True) for c in categories},
    }
