#!/usr/bin/env bash
# Verifies draftwise's CUDA path in one short GPU window (issue 32 part 6), with no network:
#   1. the test suite's CUDA-marked tests (tests/targets/test_cuda.py: targets against transformers, lossless
#      pld/eagle speculation on the device);
#   2. a short `draftwise bench` of ar,eagle,ltd on a random-weight Llama-shaped model (SmolLM2-135M's shape, built
#      here in seconds with a BPE tokenizer trained on the bundled prompts) with a randomly initialised draft head
#      and the shipped LTD fit. Random weights: the speeds say the path runs, not what a real model gains.
# Fails fast (the first failing step stops it) and prints a summary. Usage: benchmarks/gpu_check.sh [WORK_DIR]
# Budget: about 2 min of tests and 3 min of bench on one H100, after the machine has started.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK=${1:-$(mktemp -d -t draftwise-gpu-check.XXXXXX)}
mkdir -p "$WORK"
declare -a SUMMARY=()
step() {  # step NAME TIMEOUT_S COMMAND...: run it, record the outcome, stop at the first failure
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name" >&2
    if timeout "$limit" "$@"; then
        SUMMARY+=("ok    $name ($((SECONDS - start)) s)")
    else
        SUMMARY+=("FAIL  $name (exit $?, $((SECONDS - start)) s)")
        summary
        exit 1
    fi
}
summary() {
    echo
    echo "gpu_check summary (work dir $WORK):"
    printf '  %s\n' "${SUMMARY[@]}"
}

step "CUDA device present" 60 python -c "
import sys, torch
if not torch.cuda.is_available():
    sys.exit('no CUDA device: nothing to check here')
print(torch.cuda.get_device_name(0), 'torch', torch.__version__, 'CUDA', torch.version.cuda)"

step "pytest -m cuda" 300 python -m pytest -q -x -m cuda -p no:cacheprovider tests/targets/test_cuda.py

step "random Llama-shaped model and draft head" 180 python - "$WORK" <<'EOF'
import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from draftwise.bench.datasets import load_questions
from draftwise.heads.model import DraftHead, DraftHeadConfig

work = Path(sys.argv[1])
texts = [turn for q in load_questions("spec-bench", None, None, False) for turn in q.turns]
bpe = Tokenizer(models.BPE())
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()
special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
bpe.train_from_iterator(texts, trainer)
tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", bos_token="<|endoftext|>")
tokenizer.chat_template = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
torch.manual_seed(0)
config = LlamaConfig(  # SmolLM2-135M's shape
    vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, rope_theta=100000.0,
    tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
)
model = LlamaForCausalLM(config).eval()
with torch.no_grad():
    model.lm_head.weight.mul_(8.0)  # peaked logits: a random model that still repeats itself, as LMs do
model.save_pretrained(work / "llama")
tokenizer.save_pretrained(work / "llama")
n = config.num_hidden_layers
head = DraftHead(DraftHeadConfig.from_target(config, (2, n // 2, n - 3), config.vocab_size))
head.save(work / "head", dtype=torch.bfloat16)
print(json.dumps({"model": str(work / "llama"), "vocab": config.vocab_size, "head": str(work / "head")}))
EOF

LTD_FIT=$(python -c "from draftwise.policies.load import POLICIES_DIR, SHIPPED_FIT; print(POLICIES_DIR / 'smollm2-135m' / SHIPPED_FIT)")
step "draftwise bench ar,eagle,ltd on cuda" 300 python -m draftwise.cli bench \
    --model "$WORK/llama" --device cuda --dtype bf16 --engine auto --methods ar,eagle,ltd \
    --method-option "eagle.draft_head=$WORK/head" --method-option "ltd.draft_head=$WORK/head" \
    --method-option "ltd.policy_dir=$LTD_FIT" --prompts spec-bench --limit 4 --max-new-tokens 64 \
    --out "$WORK/bench"

step "every method ran, none lost a token" 30 python - "$WORK/bench/results.json" <<'EOF'
import json
import sys

results = json.load(open(sys.argv[1]))
overall, missing = results["summary"]["overall"], results.get("unavailable") or {}
for method, row in overall.items():
    print(f"  {method:6s} {row.get('tokens_per_s') or 0:8.1f} tok/s  speedup {row.get('speedup') or 0:5.2f}  "
          f"mismatches {row.get('mismatch', 0)}")
bad = [m for m in ("ar", "eagle", "ltd") if m not in overall] + [m for m, r in overall.items() if r.get("mismatch")]
if missing or bad:
    sys.exit(f"methods that did not run or lost tokens: {sorted(set(bad))}; unavailable: {missing}")
EOF

summary
