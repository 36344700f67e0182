"""PNG plots of a benchmark run (matplotlib, Agg backend, so it works without a display)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from draftwise.bench.metrics import BASELINE
from draftwise.core.errors import DraftwiseError

SPLIT = (("prefill_s", "prefill"), ("draft_s", "draft"), ("verify_s", "verify"), ("overhead_s", "loop overhead"))


def load_profile(path: Path) -> dict[int, float]:
    """A cost profile: `{"verify_ms": {"<tree size>": milliseconds, ...}}`, one target forward per size."""
    try:
        points = json.loads(path.read_text())["verify_ms"]
        profile = {int(size): float(ms) for size, ms in points.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DraftwiseError(
            f'--profile {path}: expected a JSON object {{"verify_ms": {{"<tree size>": ms, ...}}}} ({exc})'
        ) from exc
    if not profile:
        raise DraftwiseError(f"--profile {path} has no points")
    return dict(sorted(profile.items()))


def _engine_turn_stats(records: list[dict], method: str) -> list[dict]:
    return [
        t["stats"]
        for r in records
        if r["method"] == method and not r["error"]
        for t in r["turns"]
        if t["stats"] is not None and t["stats"]["rounds"] > 0
    ]


def plot_speedup(plt, summary: dict, methods: list[str], path: Path) -> None:
    scopes = {**summary["categories"], "overall": summary["overall"]}
    shown = [m for m in methods if m != BASELINE]
    width = 0.8 / max(len(shown), 1)
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.25 * len(scopes) * max(len(shown), 1) + 2)), 5.5))
    for k, method in enumerate(shown):
        values = [rows[method]["speedup"] or 0.0 for rows in scopes.values()]
        offset = (k - (len(shown) - 1) / 2) * width
        ax.bar([i + offset for i in range(len(scopes))], values, width, label=method)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label=f"{BASELINE} = 1")
    ax.set_xticks(range(len(scopes)), list(scopes), rotation=30, ha="right")
    ax.set_ylabel(f"speedup over {BASELINE} (tokens/s ratio)")
    ax.set_title("Speedup by category")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tau(plt, summary: dict, methods: list[str], path: Path) -> None:
    shown = [m for m in methods if summary["overall"][m]["tau"] is not None]
    values = [summary["overall"][m]["tau"] for m in shown]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(shown) + 2), 4))
    bars = ax.bar(shown, values, color="tab:green")
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylabel("τ (tokens per round, bonus included)")
    ax.set_title("Mean accepted length by method")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_draft_calls(plt, records: list[dict], methods: list[str], path: Path) -> None:
    """Histogram of draft calls per round. Methods that never call a draft network (ar, pld, peers) are left out."""
    values = {m: [c for s in _engine_turn_stats(records, m) for c in s["round_draft_calls"]] for m in methods}
    values = {m: v for m, v in values.items() if any(v)}
    fig, ax = plt.subplots(figsize=(6, 4))
    if values:
        ax.hist(list(values.values()), bins=min(20, max(5, sum(map(len, values.values())) // 2)), label=list(values))
        ax.legend(fontsize="small")
    else:
        ax.text(
            0.5, 0.5, "no method in this run calls a draft network", ha="center", va="center", transform=ax.transAxes
        )
    ax.set_xlabel("draft calls per round")
    ax.set_ylabel("rounds")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title("Draft calls per round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_time_split(plt, summary: dict, methods: list[str], path: Path) -> None:
    """Milliseconds per new token, split where the engine measured it; the bars' length is the wall time."""
    rows = [(m, summary["overall"][m]) for m in methods if summary["overall"][m]["new_tokens"]]
    fig, ax = plt.subplots(figsize=(7.5, 0.6 * len(rows) + 2.6))
    labels = [m for m, _ in rows]
    left = [0.0] * len(rows)

    def per_token_ms(seconds: list[float]) -> list[float]:
        return [1000 * s / row["new_tokens"] for s, (_, row) in zip(seconds, rows, strict=True)]

    segments = [
        (label, per_token_ms([(row["time_split_s"] or {}).get(key, 0.0) for _, row in rows])) for key, label in SPLIT
    ]
    segments += [
        (
            "outside the engine (chat template, detokenise)",
            per_token_ms(
                [row["wall_s"] - sum(row["time_split_s"].values()) if row["time_split_s"] else 0.0 for _, row in rows]
            ),
        ),
        ("not split (peer)", per_token_ms([0.0 if row["time_split_s"] else row["wall_s"] for _, row in rows])),
    ]
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:gray"]
    for (label, widths), color in zip(segments, colors, strict=True):
        ax.barh(labels, widths, left=left, label=label, color=color)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("ms per new token")
    ax.set_title("Where the time goes")
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_verify_cost(plt, profile: dict[int, float], records: list[dict], methods: list[str], path: Path) -> None:
    """The profiled cost of one verify forward by tree size, with this run's per-turn means on top."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(list(profile), list(profile.values()), "o-", color="black", label="profile")
    for method in methods:
        stats = _engine_turn_stats(records, method)
        if stats:
            ax.scatter(
                [s["verified_tokens"] / s["rounds"] for s in stats],
                [1000 * s["verify_s"] / s["rounds"] for s in stats],
                s=14,
                alpha=0.6,
                label=f"{method} (mean per turn)",
            )
    ax.set_xlabel("tree size (tokens verified in one forward)")
    ax.set_ylabel("verify time per round (ms)")
    ax.set_title("Verification cost by tree size")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(
    out: Path, summary: dict, records: list[dict], methods: list[str], profile: dict[int, float] | None
) -> list[str]:
    """Write every plot into `out`; returns their file names (for the report). Without matplotlib (the optional
    [bench] extra) there are no plots, and the numbers are kept: results.json and report.md do not need them."""
    try:
        import matplotlib  # the optional [bench] extra
    except ImportError:
        print("[draftwise] no plots: matplotlib is missing (pip install 'draftwise[bench]')", file=sys.stderr)
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {
        "speedup_by_category.png": lambda p: plot_speedup(plt, summary, methods, p),
        "tau_by_method.png": lambda p: plot_tau(plt, summary, methods, p),
        "draft_calls_per_round.png": lambda p: plot_draft_calls(plt, records, methods, p),
        "time_split.png": lambda p: plot_time_split(plt, summary, methods, p),
    }
    if profile:
        plots["verify_cost.png"] = lambda p: plot_verify_cost(plt, profile, records, methods, p)
    for name, draw in plots.items():
        draw(out / name)
    return list(plots)
