"""`draftwise profile --engine vllm`: run vLLM with draftwise's proposer drafting at full length and logging every
step, then fit (1) vLLM's step time by batch size and tokens scheduled, (2) the acceptance model of the learned
draft length (`integrations.vllm.LengthPolicy`), and (3) the `num_speculative_tokens_per_batch_size` schedule that
maximises throughput at each batch size. The prompts are ShareGPT turns the shipped head was not trained on, never
evaluation prompts."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from draftwise.core.errors import DraftwiseError
from draftwise.core.files import write_atomic
from draftwise.core.machine import cache_dir
from draftwise.integrations.vllm import LengthPolicy, check_vllm, speculative_config
from draftwise.targets.models import resolve_model
from draftwise.training.distill import untrained_sharegpt_prompts

BATCH_SIZES = (1, 2, 4, 8, 16)


def default_vllm_dir(model: str) -> Path:
    return cache_dir() / "vllm" / Path(model).name


def read_log(path: Path) -> tuple[list[dict], list[dict]]:
    """(step timings, draft verdicts) from a proposer log."""
    steps, drafts = [], []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        (steps if "step_ms" in record else drafts).append(record)
    return steps, drafts


def fit_cost(steps: list[dict], min_samples: int = 8) -> tuple[list[int], list[float], list[float]]:
    """Per batch size: step_ms = base + per_token * tokens scheduled (least squares on the steps below the 90th
    percentile, which drops the steps where vLLM also admitted a prompt or sat idle)."""
    by_batch: dict[int, list[tuple[int, float]]] = {}
    for s in steps:
        by_batch.setdefault(int(s["batch"]), []).append((int(s["tokens"]), float(s["step_ms"])))
    batches, bases, slopes = [], [], []
    for batch in sorted(by_batch):
        samples = np.asarray(by_batch[batch], dtype=float)
        samples = samples[samples[:, 1] <= np.percentile(samples[:, 1], 90)]
        if len(samples) < min_samples:
            continue
        tokens, ms = samples[:, 0], samples[:, 1]
        slope = max(float(np.polyfit(tokens, ms, 1)[0]), 0.0) if np.ptp(tokens) > 0 else 0.0
        batches.append(batch)
        bases.append(round(float(np.median(ms - slope * tokens)), 4))
        slopes.append(round(slope, 4))
    if not batches:
        raise DraftwiseError("too few vLLM steps logged to fit a step-time model (generate more tokens)")
    return batches, bases, slopes


def fit_acceptance(drafts: list[dict], steps: int = 200, l2: float = 1e-3) -> list[float]:
    """Logistic regression (Newton's method) of `token j accepted | tokens before it accepted` on its features."""
    x, y = [], []
    for record in drafts:
        accepted = int(record["accepted"])
        for depth, feats in enumerate(record["features"]):
            if depth > accepted:
                break
            x.append(feats)
            y.append(1.0 if depth < accepted else 0.0)
    if len(x) < 20:
        raise DraftwiseError("too few drafts logged to fit an acceptance model (generate more tokens)")
    x, y = np.asarray(x), np.asarray(y)
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) + l2 * w
        hessian = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(len(w))
        step = np.linalg.solve(hessian, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return [round(float(v), 5) for v in w]


def best_schedule(drafts: list[dict], steps: list[dict], policy: LengthPolicy, k_max: int) -> list[list[int]]:
    """For each batch size, the fixed draft length k that maximises expected tokens per second under the fitted
    step time, from the logged drafts truncated to k; consecutive sizes with the same k merge into one range."""
    row_steps = sum(int(s["batch"]) for s in steps) or 1
    accepted = np.asarray([int(r["accepted"]) for r in drafts])
    drafted = np.asarray([len(r["features"]) for r in drafts])
    best = []
    for batch in range(1, max(policy.cost_batch) + 1):
        base, per_token = policy.step_cost(batch)
        rates = []
        for k in range(k_max + 1):
            tokens = 1 + np.minimum(accepted, k).sum() / row_steps  # per request and step
            scheduled = 1 + np.minimum(drafted, k).sum() / row_steps
            rates.append(batch * tokens / (base + per_token * batch * scheduled))
        best.append(int(np.argmax(rates)))
    schedule: list[list[int]] = []
    for batch, k in enumerate(best, start=1):
        if schedule and schedule[-1][2] == k:
            schedule[-1][1] = batch
        else:
            schedule.append([batch, batch, k])
    schedule[-1][1] = 1024  # the last range covers every larger batch
    return schedule


def profile_vllm(
    model: str,
    k_max: int = 6,
    dtype: str = "bfloat16",
    max_new_tokens: int = 128,
    prompts_per_size: int = 16,
    datastore: str | None = None,
    out_dir: Path | None = None,
) -> tuple[Path, list[list[int]]]:
    """Log vLLM steps with the proposer at full length over batches of BATCH_SIZES, fit, and save policy.json and
    schedule.json under `out_dir` (default: the user cache). Returns (policy path, schedule)."""
    check_vllm()
    from vllm import LLM, SamplingParams  # noqa: PLC0415 - optional extra

    model_dir = resolve_model(model)
    out_dir = out_dir or default_vllm_dir(model)
    sources = ["prompt", "outputs"] + (["datastore"] if datastore else [])
    total = sum(BATCH_SIZES) * max(1, prompts_per_size // 4)
    prompts = untrained_sharegpt_prompts(5000, total)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "rounds.jsonl"
        config = speculative_config(k_max, sources=sources, datastore=datastore, log=str(log))
        llm = LLM(
            model=str(model_dir),
            dtype=dtype,
            max_model_len=2048,
            seed=0,
            speculative_config=config,
            hf_overrides=_hf_overrides(model_dir),
        )
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        start = 0
        for _ in range(max(1, prompts_per_size // 4)):
            for size in BATCH_SIZES:
                llm.generate(prompts[start : start + size], params, use_tqdm=False)
                start += size
        del llm  # the engine process flushes its log on exit
        for _ in range(60):
            if log.exists():
                break
            time.sleep(1)
        time.sleep(2)
        steps, drafts = read_log(log)
    batches, bases, slopes = fit_cost(steps)
    policy = LengthPolicy(fit_acceptance(drafts), batches, bases, slopes)
    schedule = best_schedule(drafts, steps, policy, k_max)
    policy.meta = {
        "model": str(model),
        "dtype": dtype,
        "k_max": k_max,
        "sources": sources,
        "steps": len(steps),
        "drafts": len(drafts),
        "date": time.strftime("%Y-%m-%d"),
        "schedule": schedule,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    policy.save(out_dir / "policy.json")
    write_atomic(out_dir / "schedule.json", json.dumps(schedule))
    return out_dir / "policy.json", schedule


def _hf_overrides(model_dir: Path) -> dict | None:
    """vLLM picks its model class from `architectures`; the embedded GGUF's conversion names none it knows."""
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") == "llama" and config.get("architectures") != ["LlamaForCausalLM"]:
        return {"architectures": ["LlamaForCausalLM"]}
    return None
