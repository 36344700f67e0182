"""Perplexity of the default model on held-out text, per engine: what the lean engine's int4 weights cost.

The text is ShareGPT first turns past the draft head's training slice (`distill.untrained_sharegpt_prompts`),
truncated to 256 tokens. transformers fp32 is the reference; bf16 rounds every weight and activation, and the
lean engine's int4 path keeps the GGUF's 4-bit codes but rounds their scales and minimums to bf16, and its
`--dtype auto` on an AVX-512 VNNI CPU (`float32+w4a8`) also rounds each product's input to int8 per group of 32,
as llama.cpp does.

    python benchmarks/perplexity.py --texts 40 --out benchmarks/runs/perplexity.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from draftwise.engine import load_target
from draftwise.training.distill import untrained_sharegpt_prompts


@torch.inference_mode()
def mean_nll(target, model, texts: list[list[int]]) -> float:
    total, count = 0.0, 0
    for ids in texts:
        tokens = torch.tensor(ids)
        if target.engine_name == "lean":  # in chunks of 16, as decode steps and draft trees see the weights
            target.reset()
            chunks = [
                target._run(chunk, torch.arange(start, start + len(chunk)), None, slice(None))[0]
                for start, chunk in zip(range(0, len(ids), 16), tokens.split(16), strict=True)
            ]
            logits = torch.cat(chunks)
        else:
            logits = model(tokens[None]).logits[0]
        total += F.cross_entropy(logits[:-1].float(), tokens[1:], reduction="sum").item()
        count += len(ids) - 1
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/runs/perplexity.json"))
    args = parser.parse_args()
    rows = {}
    texts = None
    for engine, dtype in (("hf", "fp32"), ("hf", "bf16"), ("lean", "fp32"), ("lean", "bf16"), ("lean", "auto")):
        model, tokenizer, target = load_target("smollm2-135m", engine, dtype)
        if texts is None:
            prompts = untrained_sharegpt_prompts(3000, args.texts, 4000)
            texts = [tokenizer(p)["input_ids"][: args.max_tokens] for p in prompts]
            texts = [t for t in texts if len(t) > 8]
        nll = mean_nll(target, model, texts)
        if f"{engine} {target.dtype_name}" in rows:
            continue  # auto chose one already measured
        rows[f"{engine} {target.dtype_name}"] = {"nll": round(nll, 5), "perplexity": round(math.exp(nll), 4)}
        print(engine, target.dtype_name, rows[f"{engine} {target.dtype_name}"], flush=True)
    tokens = sum(len(t) - 1 for t in texts)
    args.out.write_text(json.dumps({"texts": len(texts), "tokens": tokens, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
