"""`draftwise train-draft`: fit a draft head to distilled data with EAGLE-3's training-time test.

Each sequence is unrolled `--ttt-steps` times (the head reading its own outputs, as it does when drafting a
tree); step k is weighted 0.8**k. Labels are the target's own greedy tokens, so only response positions
count. With `--soft-labels w` a share w of the loss is the cross-entropy to the target's whole next-token
distribution over the draft vocabulary (EAGLE's soft targets), read off the stored final-layer features.
Checkpoints are written every `--checkpoint-every` steps and a rerun resumes from the last one.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from draftwise.core.errors import DraftwiseError
from draftwise.core.machine import cpu_has_native_bf16
from draftwise.heads.model import DraftHead, DraftHeadConfig, init_from_target
from draftwise.targets.models import load_model
from draftwise.training.distill import distill_feature_layers, load_distill_data

STEP_WEIGHT = 0.8


def draft_vocabulary(samples: list[dict], size: int, vocab_size: int) -> torch.Tensor:
    """The `size` most frequent response tokens, sorted: draft id -> target id."""
    counts: Counter[int] = Counter()
    for s in samples:
        counts.update(s.get("labels", s["ids"])[int(s["response_from"]) :].tolist())
    ranked = [t for t, _ in counts.most_common(size)]
    filler = (t for t in range(vocab_size) if t not in counts)
    ranked += [next(filler) for _ in range(size - len(ranked))]
    return torch.tensor(sorted(ranked))


def sequence_loss(
    head: DraftHead,
    sample: dict,
    layer_index: list[int],
    target_to_draft: torch.Tensor,
    steps: int,
    soft: SoftLabels | None = None,
):
    """Weighted loss and per-step (correct, counted) for one sequence."""
    ids = sample["ids"].long()
    # the target's greedy next token after each position: given (teacher-forced data) or the data itself
    predicted = sample["labels"].long() if "labels" in sample else torch.cat([ids[1:], ids[-1:]])
    response_from = int(sample["response_from"])
    features = sample["features"][:, layer_index].float()
    outputs = head.unroll(features, ids, steps)
    target_probs = soft.probabilities(sample["features"]) if soft else None
    loss, stats = 0.0, []
    for k, normed in enumerate(outputs):
        m = normed.shape[0]
        labels = predicted[k + 1 : k + 1 + m]
        counted = torch.arange(k + 2, k + 2 + m) >= response_from
        logits = head.lm_head(normed[counted])  # the LM head is most of the cost: only where a label counts
        labels = labels[counted]
        draft_labels = target_to_draft[labels]
        trained = draft_labels >= 0
        hard = F.cross_entropy(logits[trained], draft_labels[trained]) if trained.any() else 0.0
        if target_probs is not None and counted.any():
            matched = -(target_probs[k + 1 : k + 1 + m][counted] * F.log_softmax(logits.float(), -1)).sum(-1).mean()
            loss = loss + STEP_WEIGHT**k * ((1 - soft.weight) * hard + soft.weight * matched)
        else:
            loss = loss + STEP_WEIGHT**k * hard
        correct = head.draft_to_target[logits.argmax(-1)] == labels
        stats.append((int(correct.sum()), labels.numel()))
    return loss, stats


class SoftLabels:
    """The target's next-token distribution over the draft vocabulary, from its stored final-layer features."""

    def __init__(self, lm_head_rows: torch.Tensor, final_index: int, weight: float):
        self.rows, self.final_index, self.weight = lm_head_rows.float(), final_index, weight

    @torch.no_grad()
    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(features[:, self.final_index].float() @ self.rows.T, dim=-1)


def uses_bf16(precision: str) -> bool:
    """bf16 autocast (fp32 master weights) where the CPU has bf16 units: several times the steps/s there."""
    return precision == "bf16" or (precision == "auto" and cpu_has_native_bf16())


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def crop(sample: dict, max_len: int) -> dict:
    """Keep at most `max_len` tokens, dropping prompt tokens first."""
    n = sample["ids"].numel()
    if n <= max_len:
        return sample
    cut = n - max_len
    return {
        "ids": sample["ids"][cut:],
        "features": sample["features"][cut:],
        **({"labels": sample["labels"][cut:]} if "labels" in sample else {}),
        "response_from": torch.tensor([max(1, int(sample["response_from"]) - cut)]),
    }


@torch.no_grad()
def evaluate(head, samples, layer_index, target_to_draft, steps, bf16: bool = False) -> list[float]:
    """Held-out top-1 accuracy of each unrolled step (response positions)."""
    totals = [[0, 0] for _ in range(steps)]
    for sample in samples:
        with autocast(bf16):
            _, stats = sequence_loss(head, sample, layer_index, target_to_draft, steps)
        for k, (c, n) in enumerate(stats):
            totals[k][0] += c
            totals[k][1] += n
    return [c / n if n else 0.0 for c, n in totals]


def train(args, target=None) -> Path:
    """Train per `args` (the CLI's options); `target` overrides loading `args.model` (tests pass a tiny one)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dirs = [Path(d) for d in args.data.split(",")]
    stored_layers = distill_feature_layers(data_dirs[0])
    if any(distill_feature_layers(d) != stored_layers for d in data_dirs[1:]):
        raise DraftwiseError("the --data directories hold features of different layers")
    layers = tuple(int(x) for x in args.feature_layers.split(","))
    if not set(layers) <= set(stored_layers):
        raise DraftwiseError(f"--feature-layers {layers} are not all in the data (it has {stored_layers})")
    layer_index = [stored_layers.index(layer) for layer in layers]
    samples = [crop(s, args.max_len) for d in data_dirs for s in load_distill_data(d)]
    samples = [s for s in samples if s["ids"].numel() - int(s["response_from"]) >= 4]
    held_out = samples[:: args.holdout_every]
    training = [s for i, s in enumerate(samples) if i % args.holdout_every]
    if not training:
        raise DraftwiseError("not enough distilled sequences to train on")

    if target is None:
        target, _ = load_model(args.model, dtype="fp32")
    if args.init_head:  # fine-tune: the head's own layers and draft vocabulary
        head = DraftHead.load(Path(args.init_head)).train()
        config = head.config
        if config.feature_layers != layers:
            raise DraftwiseError(f"--init-head reads layers {config.feature_layers}, not --feature-layers {layers}")
    else:
        config = DraftHeadConfig.from_target(target.config, layers, min(args.draft_vocab, target.config.vocab_size))
        head = DraftHead(config)
        head.draft_to_target.copy_(draft_vocabulary(training, config.draft_vocab_size, config.target_vocab_size))
        head = init_from_target(head, target)
    head.attach_embedding(target.model.embed_tokens.weight)
    soft = None
    if args.soft_labels:
        final = target.config.num_hidden_layers
        if final not in stored_layers:
            raise DraftwiseError(f"--soft-labels needs the final layer's features ({final}) in the data")
        rows = target.lm_head.weight.detach()[head.draft_to_target]
        soft = SoftLabels(rows, stored_layers.index(final), args.soft_labels)
    del target

    total_steps = args.epochs * math.ceil(len(training) / args.accumulate)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, total_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total_steps))),
    )
    target_to_draft = torch.full((config.target_vocab_size,), -1, dtype=torch.long)
    target_to_draft[head.draft_to_target] = torch.arange(config.draft_vocab_size)
    bf16 = uses_bf16(args.precision)
    step, elapsed, before = 0, 0.0, None
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists():
        state = load_checkpoint(checkpoint, args)
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, elapsed, before = state["step"], state["elapsed_s"], state.get("before")
        print(f"resuming from step {step}")
    elif args.init_head:  # the fine-tuning's baseline: the given head on this data's held-out split
        before = evaluate(head.eval(), held_out, layer_index, target_to_draft, args.ttt_steps, bf16)
        print(f"before fine-tuning: held-out top-1 per step {[round(a, 3) for a in before]}")

    def save_checkpoint() -> None:
        state = {
            "head": head.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "step": step,
            "elapsed_s": elapsed,
            "before": before,
            "arguments": resumed_arguments(args),
        }
        torch.save(state, str(checkpoint) + ".tmp")
        Path(str(checkpoint) + ".tmp").rename(checkpoint)

    log = (out / "log.jsonl").open("a")
    bar = tqdm(total=total_steps, initial=step, desc="train-draft", unit="step")
    started = time.perf_counter() - elapsed
    head.train()
    while step < total_steps:
        epoch, offset = divmod(step * args.accumulate, len(training))
        order = list(range(len(training)))
        random.Random(args.seed + epoch).shuffle(order)
        batch = [training[i] for i in order[offset : offset + args.accumulate]]
        loss_sum, acc = 0.0, [[0, 0] for _ in range(args.ttt_steps)]
        for sample in batch:
            with autocast(bf16):
                loss, stats = sequence_loss(head, sample, layer_index, target_to_draft, args.ttt_steps, soft)
            if torch.is_tensor(loss):
                (loss / len(batch)).backward()
                loss_sum += loss.item() / len(batch)
            for k, (c, n) in enumerate(stats):
                acc[k][0] += c
                acc[k][1] += n
        torch.nn.utils.clip_grad_norm_(head.parameters(), 0.5)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - started
        accuracy = [round(c / n, 3) if n else None for c, n in acc]
        bar.set_postfix(loss=f"{loss_sum:.3f}", acc=accuracy[:4])
        bar.update(1)
        record = {"step": step, "loss": loss_sum, "acc": accuracy, "lr": schedule.get_last_lr()[0], "s": elapsed}
        if step % args.eval_every == 0 or step == total_steps:
            head.eval()
            record["heldout_acc"] = evaluate(head, held_out, layer_index, target_to_draft, args.ttt_steps, bf16)
            head.train()
            bar.write(f"step {step}: held-out top-1 per step {[round(a, 3) for a in record['heldout_acc']]}")
        log.write(json.dumps(record) + "\n")
        log.flush()
        if step % args.checkpoint_every == 0 or step == total_steps:
            save_checkpoint()
        if args.max_minutes and elapsed > args.max_minutes * 60:
            save_checkpoint()
            bar.write(f"time budget reached at step {step}; rerun to continue")
            break
    bar.close()
    head.eval()
    heldout = evaluate(head, held_out, layer_index, target_to_draft, args.ttt_steps, bf16)
    tokens = sum(int(s["ids"].numel() - s["response_from"]) for s in training)
    summary = {
        "train_sequences": len(training),
        "train_response_tokens": tokens,
        "heldout_sequences": len(held_out),
        "steps": step,
        "wall_time_s": round(elapsed, 1),
        "heldout_top1_per_step": [round(a, 4) for a in heldout],
        **({"heldout_top1_before": [round(a, 4) for a in before]} if before else {}),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    head.save(out / "head", card=model_card(args, config, summary))
    print(json.dumps(summary))
    return out / "head"


def model_card(args, config: DraftHeadConfig, summary: dict) -> str:
    params = sum(p.numel() for p in DraftHead(config).parameters())
    accuracy = ", ".join(f"step {k}: {a:.1%}" for k, a in enumerate(summary["heldout_top1_per_step"]))
    before = summary.get("heldout_top1_before")
    before = f" Before fine-tuning: {', '.join(f'{a:.1%}' for a in before)}." if before else ""
    return f"""# Draft head for {args.model}

EAGLE-3-style head: target features at layers {list(config.feature_layers)} fused by one linear layer, paired with
the next token's embedding (the target's, not stored here), one decoder layer, and an LM head over a
{config.draft_vocab_size}-token draft vocabulary (the most frequent response tokens, mapped back to target ids).
{params / 1e6:.1f} M parameters, stored in bf16.

- Data: `{args.data}` ({summary["train_sequences"]} training sequences, {summary["train_response_tokens"]} response
  tokens; {summary["heldout_sequences"]} held out).
- Training: `draftwise train-draft --data {args.data} --epochs {args.epochs} --ttt-steps {args.ttt_steps}
  --max-len {args.max_len} --lr {args.lr} --draft-vocab {args.draft_vocab} --precision {args.precision}
  --soft-labels {args.soft_labels}{f" --init-head {args.init_head}" if args.init_head else ""}`;
  {summary["steps"]} optimizer steps of
  {args.accumulate} sequences, {summary["wall_time_s"] / 60:.0f} minutes on this machine's CPU.
- Held-out top-1 accuracy of the unrolled predictions (training-time test): {accuracy}.{before}
"""


# what a resumed run must share with the run that wrote the checkpoint (the rest may change, e.g. --max-minutes)
RESUMED_ARGUMENTS = (
    "model",
    "data",
    "feature_layers",
    "draft_vocab",
    "ttt_steps",
    "soft_labels",
    "init_head",
    "accumulate",
    "lr",
    "max_len",
    "holdout_every",
    "seed",
    "precision",
)  # fmt: skip; --epochs may grow: a longer schedule resumes where the shorter one stopped


def resumed_arguments(args) -> dict:
    return {name: getattr(args, name) for name in RESUMED_ARGUMENTS}


def load_checkpoint(checkpoint: Path, args) -> dict:
    """The state a rerun resumes from, if it was made with the same arguments."""
    # weights_only: a planted checkpoint.pt must not run code; ours holds only tensors, numbers and dicts
    try:
        state = torch.load(checkpoint, weights_only=True)
    except Exception as exc:  # unpickling refuses anything but plain data
        raise DraftwiseError(f"cannot resume from {checkpoint}: {str(exc).splitlines()[0]}") from exc
    differ = {k: (v, resumed_arguments(args).get(k)) for k, v in state.get("arguments", {}).items()}
    differ = {k: pair for k, pair in differ.items() if pair[0] != pair[1]}
    if differ:
        said = ", ".join(f"--{k.replace('_', '-')} {then!r} then, {now!r} now" for k, (then, now) in differ.items())
        raise DraftwiseError(f"{checkpoint} was made with other arguments ({said}); use them or another --out")
    return state
