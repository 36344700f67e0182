"""`draftwise profile --engine vllm`: run vLLM with draftwise's proposer drafting at full length and logging every
step, then fit (1) vLLM's step time by batch size and tokens scheduled, (2) the acceptance model of the learned
draft length (`integrations.vllm.LengthPolicy`), and (3) the `num_speculative_tokens_per_batch_size` schedule that
maximises throughput at each batch size. The prompts are ShareGPT turns the shipped head was not trained on, never
evaluation prompts."""

from __future__ import annotations

import json
import shutil
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


def fit_cost(steps: list[dict], min_samples: int = 16) -> list[float]:
    """vLLM's step time as c0 + c1·batch + c2·tokens + c3·tokens² (least squares, c1..c3 kept non-negative), on the
    steps at or below the 90th percentile of their batch size: the slower ones also admitted a prompt (whose tokens
    the proposer does not see) or waited for requests."""
    by_batch: dict[int, list[tuple[int, int, float]]] = {}
    for s in steps:
        by_batch.setdefault(int(s["batch"]), []).append((int(s["batch"]), int(s["tokens"]), float(s["step_ms"])))
    kept = []
    for samples in by_batch.values():
        ms = np.asarray([m for _, _, m in samples])
        kept += [x for x, m in zip(samples, ms, strict=True) if m <= np.percentile(ms, 90)]
    if len(kept) < min_samples:
        raise DraftwiseError("too few vLLM steps logged to fit a step-time model (generate more tokens)")
    data = np.asarray(kept, dtype=float)
    batch, tokens, ms = data[:, 0], data[:, 1], data[:, 2]
    columns = np.stack([np.ones_like(batch), batch, tokens, tokens**2], 1)
    free = [0, 1, 2, 3]
    while True:  # drop a term that comes out negative and refit (a step cannot get cheaper with more work)
        coef = np.linalg.lstsq(columns[:, free], ms, rcond=None)[0]
        negative = [f for f, c in zip(free, coef, strict=True) if f and c < 0]
        if not negative:
            break
        free.remove(negative[0])
    cost = [0.0] * 4
    for f, c in zip(free, coef, strict=True):
        cost[f] = round(float(c), 6)
    return cost


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


def _rate(batch: int, policy: LengthPolicy, row_steps: int, accepted: np.ndarray, sent: np.ndarray) -> float:
    """Expected tokens/s of a batch whose requests draft like the logged drafts, `sent[i]` tokens of draft i."""
    tokens = 1 + np.minimum(accepted, sent).sum() / row_steps  # per request and step
    scheduled = 1 + sent.sum() / row_steps
    return batch * tokens / policy.step_ms(batch, batch * scheduled) * 1e3


def offline_rates(
    drafts: list[dict], steps: list[dict], policy: LengthPolicy, k_max: int, sizes=(1, 2, 4, 8, 16)
) -> dict[int, dict]:
    """Tokens/s on the logged drafts at each fitted batch size for: every fixed k; the learned length (each draft's
    tokens whose survival beats the batch's rate per unit of step time, iterated to its fixed point); and an oracle
    that knows each verdict and sends exactly the tokens that will be accepted. No length policy can beat the
    oracle, so `oracle / best fixed` bounds what any learned length can gain on this drafter."""
    row_steps = sum(int(s["batch"]) for s in steps) or 1
    accepted = np.asarray([int(r["accepted"]) for r in drafts])
    drafted = np.asarray([len(r["features"]) for r in drafts])
    survivals = [
        np.cumprod(1 / (1 + np.exp(-(np.asarray(r["features"]) @ np.asarray(policy.weights))))) for r in drafts
    ]
    out = {}
    for batch in sizes:
        rates = {f"k={k}": _rate(batch, policy, row_steps, accepted, np.minimum(drafted, k)) for k in range(k_max + 1)}
        sent = np.zeros(len(drafts), int)
        for _ in range(20):  # the fixed point of: send a token where q > (tokens per ms earned) × (its marginal cost)
            earned = _rate(batch, policy, row_steps, accepted, sent) / 1e3
            scheduled = batch * (1 + sent.sum() / row_steps)
            per_token = policy.step_ms(batch, scheduled + 1) - policy.step_ms(batch, scheduled)
            sent = np.asarray([int((q > earned * per_token).sum()) for q in survivals])
        rate = _rate(batch, policy, row_steps, accepted, sent)
        rates["learned"] = rate
        rates["oracle"] = _rate(batch, policy, row_steps, accepted, accepted)
        out[batch] = {name: round(float(v), 1) for name, v in rates.items()}
    return out


def best_schedule(
    drafts: list[dict], steps: list[dict], policy: LengthPolicy, k_max: int, max_batch: int = 64
) -> list[list[int]]:
    """For each batch size, the fixed draft length k that maximises expected tokens per second under the fitted
    step time, from the logged drafts truncated to k; consecutive sizes with the same k merge into one range."""
    row_steps = sum(int(s["batch"]) for s in steps) or 1
    accepted = np.asarray([int(r["accepted"]) for r in drafts])
    drafted = np.asarray([len(r["features"]) for r in drafts])
    best = []
    for batch in range(1, max_batch + 1):
        rates = [_rate(batch, policy, row_steps, accepted, np.minimum(drafted, k)) for k in range(k_max + 1)]
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
    from vllm.inputs import TokensPrompt  # noqa: PLC0415

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
            hf_overrides=hf_overrides(model_dir),
        )
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        tokenizer = llm.get_tokenizer()
        chats = [TokensPrompt(prompt_token_ids=chat_ids(tokenizer, p)) for p in prompts]
        start = 0
        for _ in range(max(1, prompts_per_size // 4)):
            for size in BATCH_SIZES:
                llm.generate(chats[start : start + size], params, use_tqdm=False)
                start += size
        del llm  # the engine process flushes its log on exit
        for _ in range(60):
            if log.exists():
                break
            time.sleep(1)
        time.sleep(2)
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, out_dir / "rounds.jsonl")  # kept beside the fit, to re-fit (`--from-log`) or inspect
    meta = {"model": str(model), "dtype": dtype, "sources": sources}
    return fit_log(out_dir / "rounds.jsonl", out_dir, k_max, meta)


def fit_log(log: Path, out_dir: Path, k_max: int, meta: dict | None = None) -> tuple[Path, list[list[int]]]:
    """Fit the step time, the acceptance model and the schedule to a proposer log; save policy.json and
    schedule.json in `out_dir`."""
    if not log.is_file():
        raise DraftwiseError(f"no proposer log at '{log}'")
    try:
        steps, drafts = read_log(log)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DraftwiseError(f"'{log}' is not a proposer log: {exc}") from exc
    policy = LengthPolicy(fit_acceptance(drafts), fit_cost(steps))
    schedule = best_schedule(drafts, steps, policy, k_max)
    policy.meta = {
        **(meta or {}),
        "k_max": k_max,
        "steps": len(steps),
        "drafts": len(drafts),
        "date": time.strftime("%Y-%m-%d"),
        "schedule": schedule,
        "offline_tokens_per_s": offline_rates(drafts, steps, policy, k_max),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    policy.save(out_dir / "policy.json")
    write_atomic(out_dir / "schedule.json", json.dumps(schedule))
    return out_dir / "policy.json", schedule


def chat_ids(tokenizer, text: str) -> list[int]:
    """The token ids a chat server feeds the model for one user turn."""
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def hf_overrides(model_dir: Path) -> dict | None:
    """vLLM picks its model class from `architectures`; the embedded GGUF's conversion names none it knows."""
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") == "llama" and config.get("architectures") != ["LlamaForCausalLM"]:
        return {"architectures": ["LlamaForCausalLM"]}
    return None
