"""`draftwise log-rounds`: full-depth eagle rounds on training prompts, logged for training tree policies (the round
logger itself: draftwise.policies.learn.logger).

Training prompts only: ShareGPT first turns past the 3000 the draft head trained on, plus GSM-style problems
from reasoning-gym (a different seed from the benchmark's, its questions excluded). Never MT-bench,
HumanEval, Spec-Bench or AlpacaEval. One Parquet part per prompt, so an interrupted run resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from draftwise.bench.datasets import gsm as benchmark_gsm
from draftwise.core.errors import DraftwiseError
from draftwise.core.verify import Sampling
from draftwise.drafters.eagle import EagleDrafter
from draftwise.engine import Engine
from draftwise.heads.load import load_head
from draftwise.policies.learn.logger import log_generation, write_part
from draftwise.training.distill import untrained_sharegpt_prompts

SHAREGPT_SKIP = 3000  # the draft head's training prompts


def training_prompts(sharegpt: int, gsm: int, seed: int = 0) -> list[tuple[str, str]]:
    """(source, prompt) pairs for logging: ShareGPT past the head's training slice, then GSM-style problems."""
    prompts = [("sharegpt", p) for p in untrained_sharegpt_prompts(SHAREGPT_SKIP, sharegpt)]
    if gsm > 0:
        try:
            import reasoning_gym  # the optional [gsm] extra
        except ModuleNotFoundError:
            return prompts
        held_out = {q.turns[0] for q in benchmark_gsm(1000)}  # the benchmark's problems (seed 0)
        dataset = reasoning_gym.create_dataset("gsm_symbolic", size=gsm * 2, seed=1234 + seed)
        fresh = [item["question"] for item in dataset if item["question"] not in held_out]
        prompts += [("gsm", q) for q in fresh[:gsm]]
    return prompts


def log_rounds(
    out: Path,
    model: str,
    dtype: str,
    draft_head: str | None,
    sharegpt: int,
    gsm: int,
    max_new_tokens: int,
    sizes: tuple[int, ...],
    depth: int,
    top_k: int,
    temperature: float,
    trajectory: str = "greedy",
) -> int:
    """Log rounds for every training prompt into `out` (one part per prompt; existing parts are kept)."""
    settings = {
        "model": model,
        "dtype": dtype,
        "draft_head": draft_head or "shipped",
        "max_new_tokens": max_new_tokens,
        "sizes": list(sizes),
        "depth": depth,
        "top_k": top_k,
        "temperature": temperature,
    }
    if trajectory != "greedy":  # a key only where it differs, so directories logged before it still resume
        settings["trajectory"] = trajectory
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old["settings"] != settings:
            raise DraftwiseError(f"{out} holds rounds logged with other settings: {old['settings']}; use another --out")
    prompts = training_prompts(sharegpt, gsm)
    meta_path.write_text(json.dumps({"settings": settings, "prompts": len(prompts)}, indent=2) + "\n")
    engine = Engine.load(model, method="ar", dtype=dtype)  # the engine generation runs on: lean where it applies
    head = load_head(engine.target, engine.model, model, draft_head)
    drafter = EagleDrafter(head, top_k=top_k, depth=depth, total_tokens=max(sizes))
    target = engine.target
    target.feature_layers = drafter.feature_layers
    law = Sampling(temperature)
    total = 0
    bar = tqdm(list(enumerate(prompts)), desc="prompts", unit="prompt")
    for prompt_id, (source, text) in bar:
        part = out / f"part-{prompt_id:05d}.parquet"
        if part.exists():
            continue
        ids = engine.encode(text)
        records = []
        draws = torch.Generator().manual_seed(prompt_id) if trajectory == "sampled" else None  # resumable: per prompt
        for i, record in enumerate(
            log_generation(target, drafter, ids, max_new_tokens, sizes, law, engine.stop_token_ids, sampled=draws)
        ):
            records.append({"prompt_id": prompt_id, "source": source, "round": i, **record})
        if records:
            write_part(part, records)
        total += len(records)
        tau = sum(r["accepted"] + 1 for r in records) / max(len(records), 1)
        bar.set_postfix(rounds=total, tau=f"{tau:.2f}")
    return total
